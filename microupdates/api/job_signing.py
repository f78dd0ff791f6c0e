"""Ed25519 signatures on stage jobs: the server's key file and the signature of every job handed to a device.

The agent verifies each job against the public key it pinned at enrolment,
so a job changed or re-sent between the API and the device is rejected
there. docs/device-protocol.md describes the format for other agents.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microupdates.protocol.device_api import StageJob, canonical_job_bytes

logger = logging.getLogger(__name__)

KEY_FILE_MODE = 0o600


class SigningKeyError(Exception):
    """Raised when the signing key file cannot be read or does not contain an Ed25519 private key."""


class JobSigner:
    """Signs stage jobs with the server's Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        raw_public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        # Base64 of the 32 raw bytes: what the enrolment response carries and agents pin.
        self.public_key_text = base64.b64encode(raw_public_key).decode("ascii")

    @classmethod
    def from_key_file(cls, path: Path) -> JobSigner:
        return cls(load_or_create_signing_key(path))

    def sign_job(self, job: StageJob) -> str:
        """Return the base64 signature of the job's canonical JSON, as the device receives it."""

        signature = self._private_key.sign(canonical_job_bytes(job.model_dump(mode="json")))
        return base64.b64encode(signature).decode("ascii")


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read the PEM key at `path`, creating it (mode 0600) when it does not exist yet."""

    if not path.exists():
        create_signing_key_file(path)
    try:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise SigningKeyError(
            f"Cannot load the job signing key {path}: {error}. Give an unencrypted PEM Ed25519 private key "
            "in MICROUPDATES_SIGNING_KEY_FILE, or remove the file to create a new key (enrolled agents then "
            "reject every job until they pin the new public key)."
        ) from error
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"The job signing key {path} is a {type(key).__name__}, not an Ed25519 private key; "
            "create one with `openssl genpkey -algorithm ed25519`."
        )

    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("The job signing key %s is readable by other users; run `chmod 600 %s`", path, path)
    return key


def create_signing_key_file(path: Path) -> None:
    """Write a new Ed25519 key to `path`, unless another process creates one first; then that one is kept."""

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        # link() fails when the file exists, so two API processes starting at
        # the same time on one data directory end up with the same key.
        os.link(temporary, path)
        logger.info("Created the job signing key %s", path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
