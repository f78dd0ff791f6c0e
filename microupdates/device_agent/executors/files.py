"""The files stage: place verified artifacts at their destinations atomically, recording what they replace.

Before anything is written, every artifact is opened, every directory
archive is checked, and the free space of each file system is compared with
what the stage will write (see free_space).

A file is written to a temporary file in its destination's directory,
fsynced and renamed over the destination. A directory arrives as a tar
archive, which is checked and extracted into a staging directory next to
the destination. Then either each entry is renamed into place, merging with
what is there, or with `replace: true` the old directory is moved aside and
the staging directory renamed in its place.

With a change log, each batch of paths is recorded, with backups of the
content it overwrites, before the first of them changes (see path_records),
so revert_files can undo the stage up to the point where it stopped.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

from microupdates.device_agent.change_log import (
    ACTION_CREATE_DIRECTORY,
    ACTION_REPLACE_DIRECTORY,
    ACTION_SET_MODE,
    ACTION_TEMPORARY,
    ACTION_WRITE,
    ChangeLog,
    PathRecord,
)
from microupdates.device_agent.device_paths import map_device_path
from microupdates.device_agent.executors.archives import ArchiveMember, extract_archive, scan_archive
from microupdates.device_agent.executors.free_space import PlannedEntry, find_space_shortage
from microupdates.device_agent.executors.path_records import PathRecorder
from microupdates.device_agent.filesystem import (
    COPY_CHUNK_BYTES,
    TEMPORARY_PREFIX,
    FileInstallError,
    fsync_directory,
    lstat_or_none,
    missing_directories,
    remove_quietly,
)
from microupdates.protocol.device_api import StepResult
from microupdates.protocol.recipe import FileEntry

logger = logging.getLogger(__name__)

NEW_FILE_MODE = 0o644
NEW_DIRECTORY_MODE = 0o755
FREE_SPACE_STEP = "check free space"


class ArtifactDownloadError(OSError):
    """Raised by `open_artifact` when an artifact could not be fetched; a later attempt may succeed."""


@dataclass
class _ResolvedEntry:
    """A file entry with its destination mapped to this machine and its artifact downloaded."""

    entry: FileEntry
    name: str
    destination: str
    artifact_path: str
    members: Optional[List[ArchiveMember]] = None


def _mismatch_message(expected: str, actual: str) -> str:
    return f"artifact content has SHA-256 {actual} but the update expects {expected}"


def _sha256_of_stream(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(COPY_CHUNK_BYTES), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _missing_parents(path: str) -> List[str]:
    """Return the directories to create so that path exists, top-most first."""

    try:
        return missing_directories(path)
    except NotADirectoryError as error:
        raise FileInstallError(error.strerror) from error


def _temporary_path(directory: str, suffix: str) -> str:
    """Return a new hidden name in directory, which the caller records before creating it."""

    return os.path.join(directory, f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}{suffix}")


def _temporary_record(path: str) -> PathRecord:
    return PathRecord(path=path, action=ACTION_TEMPORARY, existed=False)


def _create_directories(directories: List[str]) -> None:
    """Create each directory, top-most first, with mode 0755 whatever the umask."""

    for directory in directories:
        os.mkdir(directory, NEW_DIRECTORY_MODE)
        os.chmod(directory, NEW_DIRECTORY_MODE)
        fsync_directory(os.path.dirname(directory))


def _copy_verified(source: str, temporary: str, expected_sha256: str) -> None:
    """Copy source into the new file temporary, checking its SHA-256, and fsync it.

    The file has mode 0600 until the caller sets the final mode. It is
    removed when anything fails.
    """

    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        digest = hashlib.sha256()
        with open(source, "rb") as reader, os.fdopen(fd, "wb") as writer:
            for chunk in iter(lambda: reader.read(COPY_CHUNK_BYTES), b""):
                digest.update(chunk)
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())

        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise FileInstallError(_mismatch_message(expected_sha256, actual))
    except BaseException:
        remove_quietly(temporary)
        raise


def _keep_owner(path: str, previous: Optional[os.stat_result]) -> None:
    """Give path the owner and group of the regular file it replaces."""

    if previous is None or not stat.S_ISREG(previous.st_mode):
        return
    current = os.lstat(path)
    if (current.st_uid, current.st_gid) != (previous.st_uid, previous.st_gid):
        os.lchown(path, previous.st_uid, previous.st_gid)


def _install_file(
    source: str, expected_sha256: str, destination: str, mode: Optional[int], recorder: PathRecorder
) -> None:
    """Replace destination atomically with a verified copy of source.

    The mode is `mode`, else that of the regular file replaced, else 0644. An
    existing symbolic link is replaced by the file and its target is left alone.
    """

    existing = lstat_or_none(destination)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise FileInstallError(f"{destination} is a directory; give kind 'directory' or another destination")

    parent = os.path.dirname(destination)
    new_directories = _missing_parents(parent)
    temporary = _temporary_path(parent, ".tmp")
    records = [recorder.capture(directory, ACTION_CREATE_DIRECTORY) for directory in new_directories]
    records.append(recorder.capture(destination, ACTION_WRITE))
    records.append(_temporary_record(temporary))
    recorder.commit(records)

    _create_directories(new_directories)
    if mode is None:
        keeps_mode = existing is not None and stat.S_ISREG(existing.st_mode)
        mode = stat.S_IMODE(existing.st_mode) if keeps_mode else NEW_FILE_MODE

    _copy_verified(source, temporary, expected_sha256)
    try:
        # chown before chmod, because chown clears the setuid and setgid bits.
        _keep_owner(temporary, existing)
        os.chmod(temporary, mode)
        os.replace(temporary, destination)
    except BaseException:
        remove_quietly(temporary)
        raise

    fsync_directory(parent)


@dataclass
class _MergeStep:
    """One change of a directory merge: create a directory, or move a staged file or link into place."""

    action: str
    target: str
    staged: Optional[str] = None
    mode: int = NEW_DIRECTORY_MODE


def _plan_directory(target: str, mode: int) -> Optional[_MergeStep]:
    existing = lstat_or_none(target)
    if existing is None:
        return _MergeStep(ACTION_CREATE_DIRECTORY, target, mode=mode)
    if stat.S_ISLNK(existing.st_mode):
        raise FileInstallError(f"{target} is a symbolic link, but the archive has a directory there")
    if not stat.S_ISDIR(existing.st_mode):
        raise FileInstallError(f"{target} exists and is not a directory, but the archive has a directory there")
    return None


def _plan_move(staged: str, target: str) -> _MergeStep:
    existing = lstat_or_none(target)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise FileInstallError(f"{target} is a directory, but the archive has a file or link there")
    return _MergeStep(ACTION_WRITE, target, staged=staged)


def _plan_merge(staging: str, destination: str, directory_modes: Dict[str, int]) -> List[_MergeStep]:
    """List the changes that merge staging into destination, parents before children.

    Conflicts (a directory where the archive has a file, or the reverse) raise
    FileInstallError here, before anything at the destination changes.
    """

    steps = []
    for current, directory_names, file_names in os.walk(staging):
        relative_directory = os.path.relpath(current, staging)
        target_directory = destination if relative_directory == "." else os.path.join(destination, relative_directory)

        for name in sorted(directory_names):
            staged = os.path.join(current, name)
            target = os.path.join(target_directory, name)
            if os.path.islink(staged):
                # os.walk lists links to directories here but does not enter them.
                steps.append(_plan_move(staged, target))
                continue
            relative = os.path.normpath(os.path.join(relative_directory, name))
            step = _plan_directory(target, directory_modes.get(relative, NEW_DIRECTORY_MODE))
            if step is not None:
                steps.append(step)

        for name in sorted(file_names):
            steps.append(_plan_move(os.path.join(current, name), os.path.join(target_directory, name)))
    return steps


def _apply_merge(steps: List[_MergeStep]) -> None:
    """Carry out the merge steps in order, fsyncing each directory that changed."""

    changed_directories = []
    for step in steps:
        if step.action == ACTION_CREATE_DIRECTORY:
            os.mkdir(step.target, step.mode)
            os.chmod(step.target, step.mode)
        else:
            assert step.staged is not None
            existing = lstat_or_none(step.target)
            if not os.path.islink(step.staged):
                _keep_owner(step.staged, existing)
            os.replace(step.staged, step.target)

        parent = os.path.dirname(step.target)
        if parent not in changed_directories:
            changed_directories.append(parent)

    for directory in changed_directories:
        fsync_directory(directory)


def _set_staged_directory_modes(staging: str, directory_modes: Dict[str, int]) -> None:
    """Give each directory below staging its mode from the archive, or 0755, before staging goes live."""

    for current, directory_names, _ in os.walk(staging):
        for name in directory_names:
            path = os.path.join(current, name)
            if not os.path.islink(path):
                relative = os.path.relpath(path, staging)
                os.chmod(path, directory_modes.get(relative, NEW_DIRECTORY_MODE))


def _replace_directory(
    staging: str,
    destination: str,
    existing: Optional[os.stat_result],
    mode: Optional[int],
    directory_modes: Dict[str, int],
    recorder: PathRecorder,
) -> None:
    """Swap the directory at destination (if any) for staging, moving the old one aside.

    The new directory gets the old directory's owner, and `mode`, else the
    old directory's mode, else 0755. The two renames are not one atomic
    step, so for a moment nothing is at destination. A crash in between is
    undone by revert_files, because the record is written first.
    """

    _set_staged_directory_modes(staging, directory_modes)
    if existing is not None:
        os.lchown(staging, existing.st_uid, existing.st_gid)
        os.chmod(staging, mode if mode is not None else stat.S_IMODE(existing.st_mode))
    else:
        os.chmod(staging, mode if mode is not None else NEW_DIRECTORY_MODE)

    record = recorder.capture(destination, ACTION_REPLACE_DIRECTORY)
    aside = recorder.aside_path(destination) if existing is not None else None
    record.backup = aside if recorder.change_log is not None else None
    recorder.commit([record])

    parent = os.path.dirname(destination)
    if aside is not None:
        os.rename(destination, aside)
    os.rename(staging, destination)
    fsync_directory(parent)
    if aside is None:
        return

    fsync_directory(os.path.dirname(aside))
    if recorder.change_log is None:
        # Without a change log nothing can restore the old directory, so it is deleted.
        shutil.rmtree(aside, ignore_errors=True)


def _extract_to_staging(source: str, expected_sha256: str, staging: str) -> Dict[str, int]:
    with open(source, "rb") as archive_file:
        actual = _sha256_of_stream(archive_file)
        if actual != expected_sha256:
            raise FileInstallError(_mismatch_message(expected_sha256, actual))
        archive_file.seek(0)
        with tarfile.open(fileobj=archive_file, mode="r:*") as archive:
            return extract_archive(archive, staging)


def _install_directory(
    source: str,
    expected_sha256: str,
    destination: str,
    mode: Optional[int],
    replace: bool,
    recorder: PathRecorder,
) -> None:
    """Merge the tar archive at source (gzip-compressed or plain) into destination, or replace destination with it.

    `mode`, when given, is applied to the destination directory itself; a
    destination that does not exist yet is otherwise created with mode 0755.
    """

    existing = lstat_or_none(destination)
    if existing is not None and stat.S_ISLNK(existing.st_mode):
        raise FileInstallError(f"{destination} is a symbolic link; give the directory it points to as destination")
    if existing is not None and not stat.S_ISDIR(existing.st_mode):
        raise FileInstallError(f"{destination} exists and is not a directory")
    is_mount_point = existing is not None and os.path.ismount(destination)
    if replace and is_mount_point:
        raise FileInstallError(
            f"{destination} is a mount point, which cannot be replaced; set replace to false to merge into it"
        )

    # Staging must be on the destination's file system so that entries can be
    # renamed into place. A destination that is a mount point gets the staging directory inside it.
    parent = os.path.dirname(destination)
    staging = _temporary_path(destination if is_mount_point else parent, "-stage")
    new_directories = _missing_parents(parent)
    records = [recorder.capture(directory, ACTION_CREATE_DIRECTORY) for directory in new_directories]
    records.append(_temporary_record(staging))
    recorder.commit(records)

    _create_directories(new_directories)
    os.mkdir(staging, 0o700)
    try:
        directory_modes = _extract_to_staging(source, expected_sha256, staging)
        if replace:
            _replace_directory(staging, destination, existing, mode, directory_modes, recorder)
            return

        steps = []
        if existing is None:
            steps.append(_MergeStep(ACTION_CREATE_DIRECTORY, destination, mode=NEW_DIRECTORY_MODE))
        steps.extend(_plan_merge(staging, destination, directory_modes))
        records = [recorder.capture(step.target, step.action) for step in steps]
        if existing is not None and mode is not None:
            records.insert(0, recorder.capture(destination, ACTION_SET_MODE))
        recorder.commit(records)

        _apply_merge(steps)
        if mode is not None:
            os.chmod(destination, mode)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _step_name(entry: FileEntry) -> str:
    return f"{entry.kind or 'file'} {entry.destination}"


def _resolve_entry(entry: FileEntry, device_root: Optional[str], open_artifact: Callable[[str], str]) -> _ResolvedEntry:
    """Map the destination, fetch the artifact and, for a directory, check its archive's members."""

    if entry.artifact is None:
        raise FileInstallError(f"the entry for {entry.destination} has no artifact digest")

    destination = map_device_path(entry.destination, device_root)
    artifact_path = open_artifact(entry.artifact)
    resolved = _ResolvedEntry(entry, _step_name(entry), destination, artifact_path)
    if entry.kind == "directory":
        with open(artifact_path, "rb") as archive_file:
            resolved.members = scan_archive(archive_file)
    return resolved


def _planned_entry(item: _ResolvedEntry) -> PlannedEntry:
    return PlannedEntry(
        label=item.entry.destination,
        destination=item.destination,
        is_directory=item.members is not None,
        replace=item.entry.replace,
        artifact_size_bytes=os.path.getsize(item.artifact_path),
        members=item.members or [],
    )


def _describe_error(error: Exception, entry: FileEntry) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"no space left on the filesystem of {entry.destination} while writing it"
    return str(error)


def _prepare(
    entries: List[FileEntry],
    device_root: Optional[str],
    open_artifact: Callable[[str], str],
    change_log: Optional[ChangeLog],
) -> Tuple[List[_ResolvedEntry], Optional[StepResult]]:
    """Resolve every entry and check free space; return the entries, or the failed step that stops the stage."""

    resolved = []
    for entry in entries:
        started = time.monotonic()
        try:
            resolved.append(_resolve_entry(entry, device_root, open_artifact))
        except ArtifactDownloadError as error:
            logger.error("Downloading %s failed: %s", _step_name(entry), error)
            return [], StepResult(
                name=_step_name(entry), duration_seconds=time.monotonic() - started, error=str(error), transient=True
            )
        except (FileInstallError, ValueError, OSError, tarfile.TarError) as error:
            logger.error("Preparing %s failed: %s", _step_name(entry), error)
            return [], StepResult(name=_step_name(entry), duration_seconds=time.monotonic() - started, error=str(error))

    started = time.monotonic()
    backup_directory = change_log.backup_directory if change_log is not None else None
    shortage = find_space_shortage([_planned_entry(item) for item in resolved], backup_directory)
    if shortage is not None:
        logger.error("Files stage stopped before writing: %s", shortage)
        return [], StepResult(name=FREE_SPACE_STEP, duration_seconds=time.monotonic() - started, error=shortage)
    return resolved, None


def install_files(
    entries: List[FileEntry],
    *,
    device_root: Optional[str],
    open_artifact: Callable[[str], str],
    abort_event: Optional[threading.Event] = None,
    change_log: Optional[ChangeLog] = None,
) -> List[StepResult]:
    """Install each entry in order and return one StepResult per entry tried.

    An entry without kind is a file. `open_artifact(sha256)` returns the path
    of the downloaded artifact, whose SHA-256 is checked again here. Nothing
    is written when an entry cannot be resolved, an archive has an unsafe
    member, or free space is short, and the only step then names the problem.
    Installing stops at the first failure or when abort_event is set, and the
    last result then has the error. With a change_log, every path is recorded
    before it changes, so the log is complete up to the failure even when an
    unexpected exception propagates.
    """

    resolved, failure = _prepare(entries, device_root, open_artifact, change_log)
    if failure is not None:
        return [failure]

    recorder = PathRecorder(change_log)
    results = []
    for item in resolved:
        if abort_event is not None and abort_event.is_set():
            results.append(StepResult(name=item.name, error="aborted"))
            break

        started = time.monotonic()
        error = None
        entry = item.entry
        try:
            if entry.kind == "directory":
                _install_directory(
                    item.artifact_path, entry.artifact, item.destination, entry.mode_bits(), entry.replace, recorder
                )
            else:
                _install_file(item.artifact_path, entry.artifact, item.destination, entry.mode_bits(), recorder)
        except (FileInstallError, ValueError, OSError, tarfile.TarError) as exception:
            error = _describe_error(exception, entry)
            logger.error("Installing %s failed: %s", item.name, error)

        results.append(StepResult(name=item.name, duration_seconds=time.monotonic() - started, error=error))
        if error is not None:
            break
        logger.info("Installed %s", item.name)

    return results
