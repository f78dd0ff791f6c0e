"""The revert_files compensation: put every path that the files stage recorded back as it was.

Records are undone newest first. A path that existed gets back its content,
kind, mode, owner, modification time and symbolic link target. For what the
update added, the rule is:

- files and symbolic links that did not exist before are removed, whatever
  they contain now;
- directories the update created are removed only when they are empty once
  that is done, so files that something else put there later survive;
- a directory that `replace: true` put in place is removed with everything
  in it, and the directory it replaced is moved back.

Each undo step brings a path to its recorded state and does nothing when it
is there already, so a revert interrupted by a crash can simply run again.
After a complete revert the change log is marked, so a later run is a no-op,
and the backups are deleted.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import time
from typing import List, Optional

from microupdates.device_agent.change_log import (
    ACTION_CREATE_DIRECTORY,
    ACTION_REPLACE_DIRECTORY,
    ACTION_SET_MODE,
    ACTION_TEMPORARY,
    ACTION_WRITE,
    ChangeLog,
    PathRecord,
)
from microupdates.device_agent.filesystem import (
    KIND_FILE,
    KIND_SYMLINK,
    TEMPORARY_PREFIX,
    apply_metadata,
    copy_file_contents,
    fsync_directory,
    kind_of,
    lstat_or_none,
    remove_quietly,
)
from microupdates.device_agent.output import BoundedOutput
from microupdates.protocol.device_api import REVERT_FILES_STAGE, StepResult

logger = logging.getLogger(__name__)

REVERT_FILES_STEP = "revert files"
NOTHING_TO_REVERT = "nothing to revert\n"


class RevertError(Exception):
    """A recorded path that cannot be put back, with a message naming it and the reason."""


def _temporary_name(parent: str) -> str:
    return os.path.join(parent, f"{TEMPORARY_PREFIX}{secrets.token_hex(6)}.tmp")


def _ensure_parent(path: str) -> str:
    """Return path's directory, recreating it (mode 0755) when something deleted it after the update."""

    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        logger.warning("Recreating %s to restore %s into it", parent, path)
        os.makedirs(parent, mode=0o755)
    return parent


def _restore_content(record: PathRecord) -> None:
    """Put the backed-up file back at record.path by a hard link or copy renamed into place."""

    if record.backup is None:
        raise RevertError(f"no backup of {record.path} was recorded, so its previous content is unknown")
    if lstat_or_none(record.backup) is None:
        raise RevertError(f"the backup {record.backup} of {record.path} is missing")

    backup_status = os.lstat(record.backup)
    current = lstat_or_none(record.path)
    if current is not None and (current.st_dev, current.st_ino) == (backup_status.st_dev, backup_status.st_ino):
        # An earlier run linked the backup back already. rename() between two
        # links to one inode does nothing, so a temporary link would stay behind.
        apply_metadata(record.path, record.mode, record.uid, record.gid)
        return

    parent = _ensure_parent(record.path)
    temporary = _temporary_name(parent)
    try:
        try:
            os.link(record.backup, temporary, follow_symlinks=False)
        except OSError:
            if record.kind != KIND_FILE:
                raise
            copy_file_contents(record.backup, temporary)
        apply_metadata(temporary, record.mode, record.uid, record.gid)
        if record.mtime_ns is not None:
            os.utime(temporary, ns=(record.mtime_ns, record.mtime_ns))
        os.replace(temporary, record.path)
    except BaseException:
        remove_quietly(temporary)
        raise
    fsync_directory(parent)


def _restore_symlink(record: PathRecord) -> Optional[str]:
    assert record.link_target is not None
    current = lstat_or_none(record.path)
    if current is not None and stat.S_ISLNK(current.st_mode) and os.readlink(record.path) == record.link_target:
        apply_metadata(record.path, None, record.uid, record.gid)
        return None

    parent = _ensure_parent(record.path)
    temporary = _temporary_name(parent)
    try:
        os.symlink(record.link_target, temporary)
        apply_metadata(temporary, None, record.uid, record.gid)
        os.replace(temporary, record.path)
    except BaseException:
        remove_quietly(temporary)
        raise
    fsync_directory(parent)
    return f"restored symbolic link {record.path} -> {record.link_target}"


def _revert_write(record: PathRecord) -> Optional[str]:
    current = lstat_or_none(record.path)
    if not record.existed:
        if current is None:
            return None
        if stat.S_ISDIR(current.st_mode):
            return f"kept {record.path}: the update created a file there, but it is now a directory"
        os.unlink(record.path)
        fsync_directory(os.path.dirname(record.path))
        return f"removed {record.path}"

    if current is not None and stat.S_ISDIR(current.st_mode):
        raise RevertError(f"{record.path} is now a directory, so the {record.kind} that was there cannot be restored")
    if record.kind == KIND_SYMLINK:
        return _restore_symlink(record)
    _restore_content(record)
    return f"restored {record.path}"


def _revert_created_directory(record: PathRecord) -> Optional[str]:
    current = lstat_or_none(record.path)
    if current is None:
        return None
    if not stat.S_ISDIR(current.st_mode):
        return f"kept {record.path}: the update created a directory there, but it is now a {kind_of(current)}"

    try:
        os.rmdir(record.path)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return f"kept {record.path}: the update created this directory, but it is not empty"
        raise
    fsync_directory(os.path.dirname(record.path))
    return f"removed directory {record.path}"


def _revert_directory_mode(record: PathRecord) -> Optional[str]:
    current = lstat_or_none(record.path)
    if current is None or not stat.S_ISDIR(current.st_mode) or record.mode is None:
        return None
    unchanged = (stat.S_IMODE(current.st_mode), current.st_uid, current.st_gid) == (
        record.mode,
        record.uid,
        record.gid,
    )
    if unchanged:
        return None
    apply_metadata(record.path, record.mode, record.uid, record.gid)
    return f"restored mode {record.mode:04o} of directory {record.path}"


def _revert_replaced_directory(record: PathRecord) -> Optional[str]:
    """Move the update's directory out of the way and the old one back.

    The update's directory is first renamed to a name derived from the
    record, so a run interrupted at any point finds it there and deletes it.
    """

    parent = os.path.dirname(record.path)
    digest = hashlib.sha256(f"{record.path}\0{record.backup}".encode("utf-8", "surrogateescape")).hexdigest()
    discarded = os.path.join(parent, f"{TEMPORARY_PREFIX}reverted-{digest[:16]}")
    if lstat_or_none(discarded) is not None:
        shutil.rmtree(discarded)

    if record.existed:
        if record.backup is None:
            raise RevertError(f"the change log does not name where the directory that {record.path} replaced went")
        if lstat_or_none(record.backup) is None:
            # An earlier run moved it back already, or the update stopped before moving it aside.
            if os.path.isdir(record.path) and not os.path.islink(record.path):
                apply_metadata(record.path, record.mode, record.uid, record.gid)
                return None
            raise RevertError(f"the directory that {record.path} replaced is missing from {record.backup}")

    removed_update_directory = lstat_or_none(record.path) is not None
    if removed_update_directory:
        os.rename(record.path, discarded)
    if record.existed:
        assert record.backup is not None
        os.rename(record.backup, record.path)
        apply_metadata(record.path, record.mode, record.uid, record.gid)
        fsync_directory(os.path.dirname(record.backup))
    fsync_directory(parent)

    if lstat_or_none(discarded) is not None:
        shutil.rmtree(discarded)
    if record.existed:
        return f"moved the previous directory {record.path} back"
    if not removed_update_directory:
        return None
    return f"removed directory {record.path} with its content, which the update created"


def _remove_temporary(record: PathRecord) -> Optional[str]:
    current = lstat_or_none(record.path)
    if current is None:
        return None
    if stat.S_ISDIR(current.st_mode):
        shutil.rmtree(record.path)
    else:
        os.unlink(record.path)
    fsync_directory(os.path.dirname(record.path))
    return f"removed {record.path}, left by an interrupted files stage"


def _revert_record(record: PathRecord) -> Optional[str]:
    """Bring one path back to its recorded state; return a line for the step output, or None when nothing changed."""

    if record.action == ACTION_WRITE:
        return _revert_write(record)
    if record.action == ACTION_CREATE_DIRECTORY:
        return _revert_created_directory(record)
    if record.action == ACTION_SET_MODE:
        return _revert_directory_mode(record)
    if record.action == ACTION_REPLACE_DIRECTORY:
        return _revert_replaced_directory(record)
    if record.action == ACTION_TEMPORARY:
        return _remove_temporary(record)
    raise RevertError(f"the change log has an unknown action {record.action!r} for {record.path}")


def revert_files(change_log: ChangeLog) -> List[StepResult]:
    """Undo every files-stage record not reverted yet and return one StepResult for the whole revert.

    A path that cannot be reverted does not stop the others. The step then
    fails, naming the first such path, and the log stays unmarked so that a
    later run retries.
    """

    started = time.monotonic()
    completed = change_log.completed_through(REVERT_FILES_STAGE) or 0
    batches = [(sequence, records) for sequence, records in change_log.read_path_records() if sequence > completed]
    if not batches:
        logger.info("revert_files: nothing to revert for deployment %s", change_log.deployment_id)
        return [StepResult(name=REVERT_FILES_STEP, output=NOTHING_TO_REVERT)]

    output = BoundedOutput()
    failures = []
    for _, records in reversed(batches):
        for record in reversed(records):
            try:
                note = _revert_record(record)
            except (OSError, RevertError) as error:
                logger.error("revert_files: could not revert %s: %s", record.path, error)
                failures.append(f"{record.path}: {error}")
                output.write(f"failed to revert {record.path}: {error}\n".encode("utf-8", "surrogateescape"))
                continue
            if note is not None:
                output.write((note + "\n").encode("utf-8", "surrogateescape"))

    duration = time.monotonic() - started
    if failures:
        error = (
            f"could not revert {len(failures)} recorded paths (the first: {failures[0]}); "
            "the other paths were reverted, and running revert_files again retries"
        )
        return [StepResult(name=REVERT_FILES_STEP, duration_seconds=duration, output=output.render(), error=error)]

    change_log.mark_completed(REVERT_FILES_STAGE, batches[-1][0])
    change_log.remove_backups()
    logger.info("revert_files: reverted deployment %s", change_log.deployment_id)
    return [
        StepResult(
            name=REVERT_FILES_STEP,
            duration_seconds=duration,
            output=output.render(),
            output_truncated=output.truncated,
        )
    ]
