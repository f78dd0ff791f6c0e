"""The files stage: place verified artifacts at their destinations atomically.

A file is written to a temporary file in its destination's directory, fsynced
and renamed over the destination. A directory arrives as a tar archive. Its
members are checked and extracted into a staging directory next to the
destination, and then each entry is renamed into place, merging with what is
there. Before each path is written, a FileChange records what was there, so
a rollback can later restore or remove it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, List, Optional

from microupdates.device_agent.device_paths import map_device_path
from microupdates.protocol.device_api import StepResult
from microupdates.protocol.recipe import FileEntry

logger = logging.getLogger(__name__)

NEW_FILE_MODE = 0o644
NEW_DIRECTORY_MODE = 0o755
COPY_CHUNK_BYTES = 1024 * 1024
TEMPORARY_PREFIX = ".microupdates-"


class FileInstallError(Exception):
    """Failure of a files-stage step, with a message naming the path and the reason."""


@dataclass(frozen=True)
class FileChange:
    """A path about to be written by the files stage and what was there before.

    `path` is the path on this machine (device root applied). `previous_kind`
    is "file", "directory", "symlink" or "other" when the path existed, else None.
    """

    path: str
    existed: bool
    previous_kind: Optional[str]


def _lstat_or_none(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _kind_of(status: os.stat_result) -> str:
    if stat.S_ISLNK(status.st_mode):
        return "symlink"
    if stat.S_ISDIR(status.st_mode):
        return "directory"
    if stat.S_ISREG(status.st_mode):
        return "file"
    return "other"


def _record_change(path: str, changes: List[FileChange]) -> Optional[os.stat_result]:
    """Append what exists at path to changes and return its lstat (None when nothing does)."""

    status = _lstat_or_none(path)
    if status is None:
        changes.append(FileChange(path=path, existed=False, previous_kind=None))
    else:
        changes.append(FileChange(path=path, existed=True, previous_kind=_kind_of(status)))
    return status


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_directories(path: str, changes: List[FileChange]) -> None:
    """Create path and its missing ancestors with mode 0755, recording each one created."""

    missing = []
    current = path
    while _lstat_or_none(current) is None:
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent

    if not os.path.isdir(current):
        raise FileInstallError(f"{current} exists and is not a directory")

    for directory in reversed(missing):
        _record_change(directory, changes)
        os.mkdir(directory, NEW_DIRECTORY_MODE)
        # mkdir applies the umask; the mode is set explicitly so it does not depend on it.
        os.chmod(directory, NEW_DIRECTORY_MODE)
        _fsync_directory(os.path.dirname(directory))


def _mismatch_message(expected: str, actual: str) -> str:
    return f"artifact content has SHA-256 {actual} but the update expects {expected}"


def _sha256_of_stream(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(COPY_CHUNK_BYTES), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _copy_verified(source: str, directory: str, expected_sha256: str) -> str:
    """Copy source into a new temporary file in directory, checking its SHA-256, and fsync it.

    Returns the temporary file's path; it has mode 0600 until the caller sets the final mode.
    """

    fd, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX, suffix=".tmp")
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
        _remove_quietly(temporary)
        raise
    return temporary


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as error:
        logger.warning("Could not remove temporary file %s: %s", path, error)


def _keep_owner(path: str, previous: Optional[os.stat_result]) -> None:
    """Give path the owner and group of the regular file it replaces."""

    if previous is None or not stat.S_ISREG(previous.st_mode):
        return
    current = os.lstat(path)
    if (current.st_uid, current.st_gid) != (previous.st_uid, previous.st_gid):
        os.lchown(path, previous.st_uid, previous.st_gid)


def _install_file(
    source: str, expected_sha256: str, destination: str, mode: Optional[int], changes: List[FileChange]
) -> None:
    """Replace destination atomically with a verified copy of source.

    The mode is `mode`, else that of the regular file replaced, else 0644. An
    existing symbolic link is replaced by the file and its target is left alone.
    """

    existing = _lstat_or_none(destination)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise FileInstallError(f"{destination} is a directory; give kind 'directory' or another destination")

    parent = os.path.dirname(destination)
    _create_directories(parent, changes)

    if mode is None:
        keeps_mode = existing is not None and stat.S_ISREG(existing.st_mode)
        mode = stat.S_IMODE(existing.st_mode) if keeps_mode else NEW_FILE_MODE

    temporary = _copy_verified(source, parent, expected_sha256)
    try:
        # chown before chmod, because chown clears the setuid and setgid bits.
        _keep_owner(temporary, existing)
        os.chmod(temporary, mode)
        _record_change(destination, changes)
        os.replace(temporary, destination)
    except BaseException:
        _remove_quietly(temporary)
        raise

    _fsync_directory(parent)


def _reject_member(member: tarfile.TarInfo, reason: str) -> None:
    raise FileInstallError(f"archive member {member.name!r} {reason}, so no file from the archive was installed")


def _check_member(member: tarfile.TarInfo) -> str:
    """Validate one archive member and return its normalised relative path.

    Rejects absolute names, `..` components, device files and FIFOs, and
    links whose target lies outside the extracted tree.
    """

    if member.name.startswith("/"):
        _reject_member(member, "has an absolute path")
    if ".." in member.name.split("/"):
        _reject_member(member, "contains '..'")
    relative = posixpath.normpath(member.name)

    if member.ischr() or member.isblk() or member.isfifo():
        _reject_member(member, "is a device file or FIFO")

    if member.issym():
        if member.linkname.startswith("/"):
            _reject_member(member, f"is a symbolic link to the absolute path {member.linkname!r}")
        target = posixpath.normpath(posixpath.join(posixpath.dirname(relative), member.linkname))
        if target == ".." or target.startswith("../"):
            _reject_member(member, f"is a symbolic link to {member.linkname!r}, outside the destination")
    elif member.islnk():
        if member.linkname.startswith("/") or ".." in member.linkname.split("/"):
            _reject_member(member, f"is a hard link to {member.linkname!r}, outside the destination")
    elif not (member.isreg() or member.isdir()):
        _reject_member(member, "has an unsupported type")

    return relative


def _check_no_symlink_parent(staging: str, relative: str, member: tarfile.TarInfo) -> None:
    """Reject a member whose path passes through a symbolic link extracted earlier.

    Without this, a link to "." followed by a member below it could place a
    relative link target that leaves the tree although it looks inside.
    """

    current = staging
    for part in relative.split("/")[:-1]:
        current = os.path.join(current, part)
        if os.path.islink(current):
            _reject_member(member, "lies inside a symbolic link from the same archive")


def _clear_path(path: str) -> None:
    """Remove a non-directory left at path by an earlier member with the same name."""

    status = _lstat_or_none(path)
    if status is not None and not stat.S_ISDIR(status.st_mode):
        os.unlink(path)


def _extract_regular_file(archive: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
    # Setuid, setgid and sticky bits are dropped: an archive from an operator's
    # machine must not create setuid programs owned by the agent's user (root).
    mode = member.mode & 0o777
    reader = archive.extractfile(member)
    if reader is None:
        _reject_member(member, "has no content")

    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with reader, os.fdopen(fd, "wb") as writer:
        shutil.copyfileobj(reader, writer, COPY_CHUNK_BYTES)
        writer.flush()
        os.fchmod(writer.fileno(), mode)
        os.fsync(writer.fileno())


def _extract_archive(archive: tarfile.TarFile, staging: str) -> Dict[str, int]:
    """Extract every member into staging after checking it.

    Directories are created with mode 0700 in staging. Their modes from the
    archive are returned by relative path and applied to directories created
    at the destination. The archive's top directory (".") gets no mode entry.
    Owners from the archive are not applied, so new entries belong to the agent's user.
    """

    directory_modes = {}
    for member in archive:
        relative = _check_member(member)
        if relative == ".":
            continue
        _check_no_symlink_parent(staging, relative, member)

        target = os.path.join(staging, relative)
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)

        if member.isdir():
            _clear_path(target)
            os.makedirs(target, mode=0o700, exist_ok=True)
            directory_modes[relative] = member.mode & 0o777
        elif member.issym():
            _clear_path(target)
            os.symlink(member.linkname, target)
        elif member.islnk():
            _clear_path(target)
            linked = os.path.join(staging, posixpath.normpath(member.linkname))
            linked_status = _lstat_or_none(linked)
            if linked_status is None or not stat.S_ISREG(linked_status.st_mode):
                _reject_member(member, f"is a hard link to {member.linkname!r}, which is not an earlier regular file")
            os.link(linked, target, follow_symlinks=False)
        else:
            _clear_path(target)
            _extract_regular_file(archive, member, target)

    return directory_modes


def _ensure_directory(path: str, mode: int, changes: List[FileChange]) -> None:
    """Create directory path with mode unless a directory exists there. A symbolic link or file there is an error."""

    existing = _lstat_or_none(path)
    if existing is None:
        _record_change(path, changes)
        os.mkdir(path, mode)
        os.chmod(path, mode)
        return
    if stat.S_ISLNK(existing.st_mode):
        raise FileInstallError(f"{path} is a symbolic link, but the archive has a directory there")
    if not stat.S_ISDIR(existing.st_mode):
        raise FileInstallError(f"{path} exists and is not a directory, but the archive has a directory there")


def _move_into_place(staged: str, destination: str, changes: List[FileChange]) -> None:
    """Rename a staged file or symbolic link over destination, keeping an existing file's owner."""

    existing = _lstat_or_none(destination)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise FileInstallError(f"{destination} is a directory, but the archive has a file or link there")

    if not os.path.islink(staged):
        _keep_owner(staged, existing)
    _record_change(destination, changes)
    os.replace(staged, destination)


def _merge_tree(staging: str, destination: str, directory_modes: Dict[str, int], changes: List[FileChange]) -> None:
    """Move everything in staging into destination, creating directories and replacing files."""

    for current, directory_names, file_names in os.walk(staging):
        relative_directory = os.path.relpath(current, staging)
        target_directory = destination if relative_directory == "." else os.path.join(destination, relative_directory)

        for name in sorted(directory_names):
            staged = os.path.join(current, name)
            relative = os.path.normpath(os.path.join(relative_directory, name))
            if os.path.islink(staged):
                # os.walk lists links to directories here but does not enter them.
                _move_into_place(staged, os.path.join(target_directory, name), changes)
            else:
                mode = directory_modes.get(relative, NEW_DIRECTORY_MODE)
                _ensure_directory(os.path.join(target_directory, name), mode, changes)

        for name in sorted(file_names):
            _move_into_place(os.path.join(current, name), os.path.join(target_directory, name), changes)

        _fsync_directory(target_directory)


def _install_directory(
    source: str, expected_sha256: str, destination: str, mode: Optional[int], changes: List[FileChange]
) -> None:
    """Merge the tar archive at source (gzip-compressed or plain) into the destination directory.

    `mode`, when given, is applied to the destination directory itself; a
    destination that does not exist yet is otherwise created with mode 0755.
    """

    existing = _lstat_or_none(destination)
    if existing is not None and stat.S_ISLNK(existing.st_mode):
        raise FileInstallError(f"{destination} is a symbolic link; give the directory it points to as destination")
    if existing is not None and not stat.S_ISDIR(existing.st_mode):
        raise FileInstallError(f"{destination} exists and is not a directory")

    parent = os.path.dirname(destination)
    _create_directories(parent, changes)

    # Staging must be on the destination's file system so that entries can be
    # renamed into place. A destination that is a mount point gets the staging directory inside it.
    staging_parent = destination if existing is not None and os.path.ismount(destination) else parent
    staging = tempfile.mkdtemp(dir=staging_parent, prefix=TEMPORARY_PREFIX + "stage-")
    try:
        with open(source, "rb") as archive_file:
            actual = _sha256_of_stream(archive_file)
            if actual != expected_sha256:
                raise FileInstallError(_mismatch_message(expected_sha256, actual))
            archive_file.seek(0)
            with tarfile.open(fileobj=archive_file, mode="r:*") as archive:
                directory_modes = _extract_archive(archive, staging)

        if existing is None:
            _ensure_directory(destination, NEW_DIRECTORY_MODE, changes)
            _fsync_directory(parent)
        _merge_tree(staging, destination, directory_modes, changes)
        if mode is not None:
            os.chmod(destination, mode)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _step_name(entry: FileEntry) -> str:
    return f"{entry.kind or 'file'} {entry.destination}"


def _install_entry(
    entry: FileEntry,
    device_root: Optional[str],
    open_artifact: Callable[[str], str],
    changes: List[FileChange],
) -> None:
    if entry.artifact is None:
        raise FileInstallError(f"the entry for {entry.destination} has no artifact digest")

    destination = map_device_path(entry.destination, device_root)
    source = open_artifact(entry.artifact)

    if entry.kind == "directory":
        _install_directory(source, entry.artifact, destination, entry.mode_bits(), changes)
    else:
        _install_file(source, entry.artifact, destination, entry.mode_bits(), changes)


def install_files(
    entries: List[FileEntry],
    *,
    device_root: Optional[str],
    open_artifact: Callable[[str], str],
    abort_event: Optional[threading.Event] = None,
    changes: Optional[List[FileChange]] = None,
) -> List[StepResult]:
    """Install each entry in order and return one StepResult per entry tried.

    An entry without kind is a file. `open_artifact(sha256)` returns the path
    of the downloaded artifact, whose SHA-256 is checked again here. Stops at
    the first failure or when abort_event is set; the last result then has the
    error. Before each path is created or replaced, a FileChange is appended to
    `changes`, so the list is complete up to the failure even when an
    unexpected exception propagates.
    """

    if changes is None:
        changes = []

    results = []
    for entry in entries:
        name = _step_name(entry)
        if abort_event is not None and abort_event.is_set():
            results.append(StepResult(name=name, error="aborted"))
            break

        started = time.monotonic()
        error = None
        try:
            _install_entry(entry, device_root, open_artifact, changes)
        except (FileInstallError, ValueError, OSError, tarfile.TarError) as exception:
            error = str(exception)
            logger.error("Installing %s failed: %s", name, error)

        results.append(StepResult(name=name, duration_seconds=time.monotonic() - started, error=error))
        if error is not None:
            break
        logger.info("Installed %s", name)

    return results
