"""Safety rules for the tar archives of directory entries, checked by the API at upload and by the agent.

An archive is safe when extracting it cannot write outside its destination.
So no member may have an absolute name or a `..` component, be a device file
or FIFO, link out of the extracted tree, or lie below a symbolic link from
the same archive. This module runs on Python 3.9.
"""

from __future__ import annotations

import posixpath
import tarfile
from typing import BinaryIO, Iterator, Set, Tuple


class UnsafeArchiveError(ValueError):
    """Raised when an archive member could write outside the destination or is of a rejected type."""


def _reject(member: tarfile.TarInfo, reason: str) -> None:
    raise UnsafeArchiveError(f"archive member {member.name!r} {reason}")


def check_member(member: tarfile.TarInfo) -> str:
    """Validate one archive member and return its normalised relative path.

    Rejects absolute names, `..` components, NUL bytes, device files and
    FIFOs, and links whose target lies outside the extracted tree.
    """

    if "\x00" in member.name or "\x00" in member.linkname:
        _reject(member, "contains a NUL byte")
    if member.name.startswith("/"):
        _reject(member, "has an absolute path")
    if ".." in member.name.split("/"):
        _reject(member, "contains '..'")
    relative = posixpath.normpath(member.name)

    if member.ischr() or member.isblk() or member.isfifo():
        _reject(member, "is a device file or FIFO")

    if member.issym():
        if member.linkname.startswith("/"):
            _reject(member, f"is a symbolic link to the absolute path {member.linkname!r}")
        target = posixpath.normpath(posixpath.join(posixpath.dirname(relative), member.linkname))
        if target == ".." or target.startswith("../"):
            _reject(member, f"is a symbolic link to {member.linkname!r}, outside the destination")
    elif member.islnk():
        if member.linkname.startswith("/") or ".." in member.linkname.split("/"):
            _reject(member, f"is a hard link to {member.linkname!r}, outside the destination")
    elif not (member.isreg() or member.isdir()):
        _reject(member, "has an unsupported type")

    return relative


def iter_checked_members(archive: tarfile.TarFile) -> Iterator[Tuple[tarfile.TarInfo, str]]:
    """Yield each member with its normalised relative path, after check_member and a symbolic-link-parent check.

    A member below a path that an earlier member made a symbolic link is
    rejected, because a link to "." followed by a member below it could
    place a link whose target looks inside but leaves the tree.
    """

    symbolic_links: Set[str] = set()
    for member in archive:
        relative = check_member(member)
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in symbolic_links:
                _reject(member, "lies inside a symbolic link from the same archive")
        if member.issym():
            symbolic_links.add(relative)
        else:
            symbolic_links.discard(relative)
        yield member, relative


def check_archive(archive_file: BinaryIO) -> int:
    """Check every member of a tar archive (gzip-compressed or plain) and return the number of members.

    Raises UnsafeArchiveError for an unsafe member and tarfile.TarError for a
    file that is not a readable tar archive.
    """

    count = 0
    with tarfile.open(fileobj=archive_file, mode="r:*") as archive:
        for _ in iter_checked_members(archive):
            count += 1
    return count
