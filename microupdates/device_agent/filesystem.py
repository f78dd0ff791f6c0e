"""Small file system helpers shared by the files stage, the change log and revert_files."""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from typing import List, Optional

logger = logging.getLogger(__name__)

# Prefix of every temporary or staging name the agent creates next to a destination.
TEMPORARY_PREFIX = ".microupdates-"
COPY_CHUNK_BYTES = 1024 * 1024

KIND_FILE = "file"
KIND_DIRECTORY = "directory"
KIND_SYMLINK = "symlink"
KIND_OTHER = "other"


class FileInstallError(Exception):
    """Failure of a files-stage step, with a message naming the path and the reason."""


def lstat_or_none(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def kind_of(status: os.stat_result) -> str:
    """Return KIND_SYMLINK, KIND_DIRECTORY, KIND_FILE or KIND_OTHER (FIFO, socket, device) for an lstat result."""

    if stat.S_ISLNK(status.st_mode):
        return KIND_SYMLINK
    if stat.S_ISDIR(status.st_mode):
        return KIND_DIRECTORY
    if stat.S_ISREG(status.st_mode):
        return KIND_FILE
    return KIND_OTHER


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    """Remove a temporary file, logging instead of raising when that fails."""

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("Could not remove temporary file %s: %s", path, error)


def missing_directories(path: str) -> List[str]:
    """Return path and those of its ancestors that do not exist, top-most first.

    Raises NotADirectoryError when the nearest existing ancestor is not a directory.
    """

    missing = []
    current = path
    while lstat_or_none(current) is None:
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent

    if not os.path.isdir(current):
        raise NotADirectoryError(errno.ENOTDIR, f"{current} exists and is not a directory", current)
    missing.reverse()
    return missing


def nearest_existing_ancestor(path: str) -> str:
    """Return path itself when it exists, else its closest existing ancestor."""

    current = os.path.abspath(path)
    while lstat_or_none(current) is None:
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def write_file_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace path with data so that a crash leaves the old or the new content, never a mix.

    The data goes to a temporary file in the same directory, which is fsynced
    and renamed over path, and then the directory is fsynced.
    """

    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as writer:
            writer.write(data)
            writer.flush()
            os.fchmod(writer.fileno(), mode)
            os.fsync(writer.fileno())
        os.replace(temporary, path)
    except BaseException:
        remove_quietly(temporary)
        raise
    fsync_directory(directory)


def copy_file_contents(source: str, target: str) -> None:
    """Copy a regular file's content into a new file at target, fsynced, with mode 0600.

    A partly written target is removed when the copy fails, for example with ENOSPC.
    """

    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with open(source, "rb") as reader, os.fdopen(fd, "wb") as writer:
            for chunk in iter(lambda: reader.read(COPY_CHUNK_BYTES), b""):
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
    except BaseException:
        remove_quietly(target)
        raise


def apply_metadata(path: str, mode: Optional[int], uid: Optional[int], gid: Optional[int]) -> None:
    """Give path (not followed when it is a symbolic link) the owner and then the mode given.

    chown comes first because it clears the setuid and setgid bits. A symbolic
    link gets only the owner, because Linux has no mode for links.
    """

    status = os.lstat(path)
    if uid is not None and gid is not None and (status.st_uid, status.st_gid) != (uid, gid):
        os.lchown(path, uid, gid)
    if mode is not None and not stat.S_ISLNK(status.st_mode):
        os.chmod(path, mode)
