"""Uploaded files stored by SHA-256 in a local directory."""

from __future__ import annotations

import hashlib
import os
import tempfile
import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from microupdates.protocol.recipe import SHA256_PATTERN

# The default of the server's max_artifact_bytes setting.
DEFAULT_MAX_ARTIFACT_BYTES = 2 * 1024 * 1024 * 1024


class ArtifactTooLargeError(Exception):
    """Raised when an upload passes the store's max_bytes."""


class ArtifactStore:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if not SHA256_PATTERN.match(sha256):
            raise ValueError(f"{sha256!r} is not a SHA-256 digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    async def save_stream(
        self, chunks: AsyncIterator[bytes], check: Callable[[Path], None] | None = None
    ) -> tuple[str, int]:
        """Write an upload to a temporary file while hashing it, then move it under its digest.

        `check(path)`, when given, runs in a thread on the complete temporary
        file; an exception from it discards the upload.
        """

        digest = hashlib.sha256()
        size = 0
        handle, temporary_path = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            with os.fdopen(handle, "wb") as output:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ArtifactTooLargeError(
                            f"The upload is more than {self.max_bytes} bytes, over the artifact limit; "
                            "raise MICROUPDATES_MAX_ARTIFACT_BYTES on the server to store larger files."
                        )
                    digest.update(chunk)
                    output.write(chunk)
                output.flush()
                os.fsync(output.fileno())

            if check is not None:
                await asyncio.to_thread(check, Path(temporary_path))
            sha256 = digest.hexdigest()
            destination = self.path_for(sha256)
            destination.parent.mkdir(exist_ok=True)
            os.replace(temporary_path, destination)
            return sha256, size
        finally:
            if os.path.exists(temporary_path):
                os.unlink(temporary_path)
