"""Verification of signed stage jobs: nothing runs on the device unless its job passes every check here.

The server signs each job with its Ed25519 key. The agent pins the public
key, together with its own device id, in STATE_DIR/server_trust.json when it
enrols (or from the `server_public_key` setting), and records there the
sequence number of the last job it accepted. A job is rejected when its
signature does not verify against the pinned key or when it names another
device. It is also rejected when its deployment id is malformed, or when its
sequence number is not greater than the last accepted one (a re-sent old job).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from microupdates.device_agent.filesystem import write_file_atomically
from microupdates.protocol.device_api import CheckInResponse, StageJob, canonical_job_bytes

logger = logging.getLogger(__name__)

TRUST_FILE = "server_trust.json"
PUBLIC_KEY_BYTES = 32
# The device-side error of every rejected job starts with this, so the operator sees why the device failed.
REJECTION_PREFIX = "job signature check failed: "
# The deployment id names a directory under STATE_DIR/changes, so it must be a single safe path component.
DEPLOYMENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class JobRejectedError(Exception):
    """Raised when a job fails verification; the message names the failed check, and the job must not run."""


class ServerKeyError(ValueError):
    """Raised when a public key is not base64 of 32 bytes."""


def decode_public_key(text: str) -> Ed25519PublicKey:
    """Decode a server public key: base64 of the 32 raw Ed25519 bytes."""

    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ServerKeyError("server public key %r is not valid base64: %s" % (text, error)) from error
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ServerKeyError(
            "server public key %r decodes to %d bytes; an Ed25519 key has %d" % (text, len(raw), PUBLIC_KEY_BYTES)
        )
    return Ed25519PublicKey.from_public_bytes(raw)


class JobVerifier:
    """The pinned server key, this device's id and the last accepted sequence number, kept in the state directory."""

    def __init__(self, state_dir: Path, configured_key: Optional[str] = None) -> None:
        self.path = state_dir / TRUST_FILE
        self.configured_key = configured_key
        self._state = self._read()

    @property
    def device_id(self) -> Optional[str]:
        return self._state.get("device_id")

    @property
    def pinned_key(self) -> Optional[str]:
        return self.configured_key or self._state.get("server_public_key")

    @property
    def last_sequence(self) -> int:
        return int(self._state.get("last_sequence", 0))

    def is_pinned(self) -> bool:
        return bool(self.pinned_key and self.device_id)

    def pin(self, device_id: str, served_key: Optional[str]) -> None:
        """Pin this device's id and the server's key; a configured `server_public_key` takes precedence."""

        if self.configured_key and served_key and served_key != self.configured_key:
            logger.error(
                "The server presents the job-signing key %s, but server_public_key is set to %s; "
                "every job will be rejected until they match", served_key, self.configured_key,
            )
        key = self.configured_key or served_key
        if not key:
            raise JobRejectedError(
                "the server sent no job-signing key; upgrade the server or set server_public_key"
            )
        decode_public_key(key)

        previous_sequence = self.last_sequence if device_id == self.device_id else 0
        self._state = {"server_public_key": key, "device_id": device_id, "last_sequence": previous_sequence}
        self._write()
        logger.info("Pinned the server's job-signing key %s for device %s", key, device_id)

    def accept(self, response: CheckInResponse) -> StageJob:
        """Verify the check-in's job and record its sequence number; raise JobRejectedError when it must not run."""

        job = response.job
        received = response.received_job
        if job is None or received is None:
            raise JobRejectedError("the check-in response carries no job as received from the server")
        if not self.is_pinned():
            raise JobRejectedError("no server public key is pinned; enrol again or set server_public_key")

        self._check_signature(received, response.job_signature)
        if job.device_id != self.device_id:
            raise JobRejectedError("the job is for device %r, but this device is %r" % (job.device_id, self.device_id))
        if not DEPLOYMENT_ID_PATTERN.match(job.deployment_id):
            raise JobRejectedError("the job names an invalid deployment id %r" % job.deployment_id)
        if job.sequence <= self.last_sequence:
            raise JobRejectedError(
                "job %d has sequence number %d, not greater than the last accepted %d, so it is a replay"
                % (job.job_id, job.sequence, self.last_sequence)
            )
        check_issued_at(job.issued_at)

        # Recorded before the job runs, so a crash in the middle cannot make the same job acceptable again.
        self._state["last_sequence"] = job.sequence
        self._write()
        return job

    def _check_signature(self, received: dict, signature: Optional[str]) -> None:
        if not signature:
            raise JobRejectedError("the job carries no signature")
        try:
            signature_bytes = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError) as error:
            raise JobRejectedError("the job signature is not valid base64: %s" % error) from error

        try:
            data = canonical_job_bytes(received)
        except ValueError as error:
            raise JobRejectedError("the job cannot be serialised for verification: %s" % error) from error
        try:
            decode_public_key(self.pinned_key or "").verify(signature_bytes, data)
        except InvalidSignature as error:
            raise JobRejectedError(
                "the signature does not match the pinned server key %s; the job was changed on the way, or the "
                "server's key changed (then delete %s or set server_public_key)" % (self.pinned_key, self.path)
            ) from error

    def _read(self) -> dict:
        try:
            with open(self.path, "r", encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {}

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(str(self.path), json.dumps(self._state).encode("utf-8"))


def check_issued_at(issued_at: Optional[str]) -> None:
    """Require an ISO 8601 issue time; its age is not checked, because device clocks may be wrong."""

    if not issued_at:
        raise JobRejectedError("the job has no issue time")
    try:
        datetime.fromisoformat(issued_at.replace("Z", "+00:00"))
    except ValueError as error:
        raise JobRejectedError("the job's issue time %r is not ISO 8601" % issued_at) from error
