"""Artifacts and tar archives for the files-stage tests."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Dict


class ArtifactStore:
    """Artifacts by SHA-256 in a temporary directory, as the agent's download cache would store them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir()
        self.paths: Dict[str, str] = {}

    def add(self, content: bytes) -> str:
        digest = hashlib.sha256(content).hexdigest()
        path = self.directory / digest
        path.write_bytes(content)
        self.paths[digest] = str(path)
        return digest

    def open(self, digest: str) -> str:
        return self.paths[digest]


def tar_bytes(members, compression: str = "gz") -> bytes:
    """Build a tar archive from (TarInfo, content or None) pairs."""

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as archive:
        for info, content in members:
            if content is not None:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def file_member(name: str, mode: int = 0o644):
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info


def dir_member(name: str, mode: int = 0o755):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info


def link_member(name: str, target: str, link_type: bytes = tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = link_type
    info.linkname = target
    return info
