"""The files stage's free-space check, done before anything is written.

Bytes needed are counted per file system (grouped by st_dev of the nearest
existing ancestor of each path) and compared with what statvfs reports as
available to unprivileged users (f_bavail), so the root reserve stays free.
Each file counts as its size rounded up to whole blocks of its file system,
and each new directory as one block. The estimate leaves out inodes and the
change log's own small JSON files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from microupdates.device_agent.executors.archives import ArchiveMember
from microupdates.device_agent.filesystem import lstat_or_none, nearest_existing_ancestor


@dataclass
class PlannedEntry:
    """One file entry, reduced to what the free-space check needs.

    `label` is the destination as the recipe names it, used in the error
    message. `destination` is the path on this machine. `members` lists the
    archive of a directory entry, and `artifact_size_bytes` is the size of a
    file entry's content.
    """

    label: str
    destination: str
    is_directory: bool
    replace: bool = False
    artifact_size_bytes: int = 0
    members: List[ArchiveMember] = field(default_factory=list)


@dataclass
class _FilesystemNeed:
    label: str
    statvfs_path: str
    block_size: int
    needed_bytes: int = 0


class SpaceBudget:
    """Bytes needed per file system, keyed by device number."""

    def __init__(self) -> None:
        self._needs: Dict[int, _FilesystemNeed] = {}

    def add(self, path: str, label: str, size_bytes: int, blocks: int = 0) -> None:
        """Count size_bytes, rounded up to whole blocks, plus `blocks` whole blocks, on the file system of path.

        path need not exist yet. The first label added for a file system names it in the error message.
        """

        existing = nearest_existing_ancestor(path)
        device = os.stat(existing).st_dev
        need = self._needs.get(device)
        if need is None:
            block_size = os.statvfs(existing).f_frsize or 1
            need = _FilesystemNeed(label=label, statvfs_path=existing, block_size=block_size)
            self._needs[device] = need

        block_count = -(-size_bytes // need.block_size) + blocks
        need.needed_bytes += block_count * need.block_size

    def find_shortage(self) -> Optional[str]:
        """Return the error message for the first file system without enough space, or None."""

        for need in self._needs.values():
            stats = os.statvfs(need.statvfs_path)
            available = stats.f_bavail * stats.f_frsize
            if need.needed_bytes > available:
                return (
                    f"not enough free space on the filesystem of {need.label}: "
                    f"{need.needed_bytes} bytes needed, {available} available"
                )
        return None


def _device_of(path: str) -> int:
    return os.stat(nearest_existing_ancestor(path)).st_dev


def _add_backup_copy(budget: SpaceBudget, path: str, backup_directory: Optional[str], backup_device: int) -> None:
    """Count the copy that backs up the regular file at path, unless a hard link will do."""

    if backup_directory is None:
        return
    status = lstat_or_none(path)
    if status is None or not os.path.isfile(path) or os.path.islink(path):
        return
    if status.st_dev != backup_device:
        budget.add(backup_directory, backup_directory, status.st_size)


def find_space_shortage(entries: List[PlannedEntry], backup_directory: Optional[str]) -> Optional[str]:
    """Return an error message when a file system lacks the space the entries and their backups need, else None.

    A backup counts only when it must be a copy, because the file is on
    another file system than backup_directory (see path_records). A directory
    that `replace: true` moves aside costs nothing, since it is renamed.
    """

    budget = SpaceBudget()
    backup_device = _device_of(backup_directory) if backup_directory is not None else -1

    for entry in entries:
        if not entry.is_directory:
            budget.add(os.path.dirname(entry.destination), entry.label, entry.artifact_size_bytes)
            _add_backup_copy(budget, entry.destination, backup_directory, backup_device)
            continue

        for member in entry.members:
            target = os.path.join(entry.destination, member.relative)
            budget.add(entry.destination, entry.label, member.size_bytes, blocks=1 if member.is_directory else 0)
            if member.is_regular_file and not entry.replace:
                _add_backup_copy(budget, target, backup_directory, backup_device)

    return budget.find_shortage()
