"""Tar archives of directory entries: member checks, a size scan and extraction into a staging directory.

Members with absolute names, `..` components, device files, FIFOs and links
that lead out of the extracted tree are rejected (the rules in
microupdates.protocol.archives, which the API also applies at upload), so
nothing in an archive can write outside its destination. Symbolic links stay
symbolic links.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Dict, List

from microupdates.device_agent.filesystem import COPY_CHUNK_BYTES, FileInstallError, lstat_or_none
from microupdates.protocol.archives import UnsafeArchiveError, iter_checked_members
from microupdates.protocol.archives import check_member as protocol_check_member


@dataclass(frozen=True)
class ArchiveMember:
    """A checked member: its normalised relative path, its type, and its size in bytes (0 unless a regular file)."""

    relative: str
    is_directory: bool
    is_regular_file: bool
    size_bytes: int


def _reject_member(member: tarfile.TarInfo, reason: str) -> None:
    raise FileInstallError(f"archive member {member.name!r} {reason}, so no file from the archive was installed")


def _installation_error(error: UnsafeArchiveError) -> FileInstallError:
    return FileInstallError(f"{error}, so no file from the archive was installed")


def check_member(member: tarfile.TarInfo) -> str:
    """Validate one archive member with the shared rules and return its normalised relative path.

    Raises FileInstallError for an unsafe member.
    """

    try:
        return protocol_check_member(member)
    except UnsafeArchiveError as error:
        raise _installation_error(error) from error


def scan_archive(archive_file: BinaryIO) -> List[ArchiveMember]:
    """Check every member of a tar archive (gzip-compressed or plain) and list them, without extracting.

    Raises FileInstallError for an unsafe member and tarfile.TarError for a corrupt archive.
    """

    members = []
    with tarfile.open(fileobj=archive_file, mode="r:*") as archive:
        try:
            for member, relative in iter_checked_members(archive):
                if relative == ".":
                    continue
                members.append(
                    ArchiveMember(
                        relative=relative,
                        is_directory=member.isdir(),
                        is_regular_file=member.isreg(),
                        size_bytes=member.size if member.isreg() else 0,
                    )
                )
        except UnsafeArchiveError as error:
            raise _installation_error(error) from error
    return members


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

    status = lstat_or_none(path)
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


def extract_archive(archive: tarfile.TarFile, staging: str) -> Dict[str, int]:
    """Extract every member into staging after checking it.

    Directories are created with mode 0700 in staging. Their modes from the
    archive are returned by relative path, for the caller to apply. The
    archive's top directory (".") gets no mode entry. Owners from the archive
    are not applied, so new entries belong to the agent's user.
    """

    directory_modes = {}
    for member in archive:
        relative = check_member(member)
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
            linked_status = lstat_or_none(linked)
            if linked_status is None or not stat.S_ISREG(linked_status.st_mode):
                _reject_member(member, f"is a hard link to {member.linkname!r}, which is not an earlier regular file")
            os.link(linked, target, follow_symlinks=False)
        else:
            _clear_path(target)
            _extract_regular_file(archive, member, target)

    return directory_modes
