"""The server's job signing key and signatures, checked with the agent's verifier, and the per-device sequence."""

from __future__ import annotations

import json
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from microupdates.api.job_signing import JobSigner, SigningKeyError, load_or_create_signing_key
from microupdates.db import jobs as job_store
from microupdates.db.session import Database
from microupdates.device_agent.job_verification import JobRejectedError, JobVerifier
from microupdates.protocol.device_api import CheckInResponse, StageJob
from microupdates.protocol.recipe import CommandStage
from tests.server.test_database import empty_postgres_database  # noqa: F401  (fixture)

SEQUENCE_THREADS = 4
SEQUENCES_PER_THREAD = 25


def make_job(sequence: int) -> StageJob:
    return StageJob(
        job_id=1, deployment_id="dep-12345678", device_id="gw-1", update_version="1.0.0", stage="before",
        progress_interval_seconds=20, command=CommandStage(run="echo hi", timeout_seconds=30),
        sequence=sequence, issued_at="2026-12-04T22:00:00.000Z",
    )


def deliver(response: CheckInResponse) -> CheckInResponse:
    """Send the response through JSON as FastAPI does, and parse it as the agent's client does."""

    body = json.loads(response.model_dump_json())
    received = CheckInResponse.model_validate(body)
    received.keep_received_job(body["job"])
    return received


def test_create_key_file_private_and_reused(tmp_path):
    path = tmp_path / "keys" / "job-signing-key.pem"

    first = JobSigner.from_key_file(path)
    second = JobSigner.from_key_file(path)

    assert path.stat().st_mode & 0o777 == 0o600
    assert first.public_key_text == second.public_key_text
    assert list(path.parent.iterdir()) == [path]


def test_load_key_rejects_garbage(tmp_path):
    path = tmp_path / "key.pem"
    path.write_text("not a key")

    with pytest.raises(SigningKeyError, match=f"Cannot load the job signing key {path}"):
        load_or_create_signing_key(path)


def test_load_key_rejects_other_algorithm(tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))

    with pytest.raises(SigningKeyError, match="not an Ed25519 private key"):
        load_or_create_signing_key(path)


def test_signed_job_verifies_on_agent(tmp_path):
    signer = JobSigner.from_key_file(tmp_path / "key.pem")
    verifier = JobVerifier(tmp_path / "agent")
    verifier.pin("gw-1", signer.public_key_text)
    job = make_job(sequence=1)

    accepted = verifier.accept(deliver(CheckInResponse(job=job, job_signature=signer.sign_job(job))))

    assert accepted == job


def test_job_signed_by_other_server_rejected(tmp_path):
    signer = JobSigner.from_key_file(tmp_path / "key.pem")
    other = JobSigner.from_key_file(tmp_path / "other.pem")
    verifier = JobVerifier(tmp_path / "agent")
    verifier.pin("gw-1", signer.public_key_text)
    job = make_job(sequence=1)

    with pytest.raises(JobRejectedError, match="signature does not match"):
        verifier.accept(deliver(CheckInResponse(job=job, job_signature=other.sign_job(job))))


def take_sequences(database: Database, device_id: str, count: int) -> list[int]:
    taken = []
    for _ in range(count):
        with database.session() as session:
            taken.append(job_store.next_job_sequence(session, device_id))
    return taken


def check_concurrent_sequences(database_url: str) -> None:
    database = Database(database_url)
    database.create_schema()
    results: list[list[int]] = [[] for _ in range(SEQUENCE_THREADS)]

    def run(index: int) -> None:
        results[index] = take_sequences(database, "gw-1", SEQUENCES_PER_THREAD)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(SEQUENCE_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    other_device = take_sequences(database, "gw-2", 2)
    database.dispose()

    taken = sorted(number for numbers in results for number in numbers)
    assert taken == list(range(1, SEQUENCE_THREADS * SEQUENCES_PER_THREAD + 1))
    for numbers in results:
        assert numbers == sorted(numbers)
    assert other_device == [1, 2]


def test_next_job_sequence_unique_on_sqlite(tmp_path):
    check_concurrent_sequences(f"sqlite:///{tmp_path / 'sequences.db'}")


def test_next_job_sequence_unique_on_postgres(empty_postgres_database):  # noqa: F811
    check_concurrent_sequences(empty_postgres_database)
