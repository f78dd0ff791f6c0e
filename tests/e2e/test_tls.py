"""The API served over HTTPS, with a throwaway CA made here; the agent and the CLI verify its certificate.

A second API process with TLS runs beside the session's stack and shares its
Temporal server, worker, database and job-signing key.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from microupdates.api.job_signing import JobSigner
from microupdates.cli.stack import free_port
from tests.cli.conftest import invoke, isolated_environment
from tests.stack_helpers import wait_for_deployment, write_recipe

API_START_TIMEOUT_SECONDS = 60.0
AGENT_LOG_TIMEOUT_SECONDS = 30.0
ENROL_TIMEOUT_SECONDS = 30.0
PROCESS_STOP_TIMEOUT_SECONDS = 15.0
CERTIFICATE_DAYS = 1


@dataclass
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def write_pem_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))


def build_certificate(subject: str, issuer: x509.Name | None, public_key, signing_key, ca: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    else:
        builder = (
            builder
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Write a throwaway CA and a server certificate for 127.0.0.1 that it signed."""

    directory = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_certificate = build_certificate("microupdates test CA", None, ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_certificate = build_certificate(
        "127.0.0.1", ca_certificate.subject, server_key.public_key(), ca_key, ca=False
    )

    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca_file.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server_certificate.public_bytes(serialization.Encoding.PEM))
    write_pem_key(files.key_file, server_key)
    return files


@pytest.fixture(scope="module")
def tls_api_url(stack, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a second API process that serves HTTPS, and return its https:// URL."""

    port = free_port()
    env = stack.server_env()
    env.update(
        MICROUPDATES_API_PORT=str(port),
        MICROUPDATES_TLS_CERT_FILE=str(tls_files.cert_file),
        MICROUPDATES_TLS_KEY_FILE=str(tls_files.key_file),
    )
    log_path = tmp_path_factory.mktemp("tls-api") / "api.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "microupdates.api.main"], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"https://127.0.0.1:{port}"
    try:
        wait_for_health(url, tls_files.ca_file, process, log_path)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=PROCESS_STOP_TIMEOUT_SECONDS)


def wait_for_health(url: str, ca_file: Path, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + API_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the TLS API exited with {process.returncode}: {log_path.read_text()}")
        try:
            verify = ssl.create_default_context(cafile=str(ca_file))
            if httpx.get(url + "/healthz", verify=verify, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the TLS API did not answer within {API_START_TIMEOUT_SECONDS} s: {log_path.read_text()}")


def start_enrolling_agent(url: str, key: str, name: str, root: Path, arguments: list[str]) -> subprocess.Popen:
    log_path = root.parent / f"{name}.agent.log"
    root.mkdir(parents=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "microupdates.device_agent.main", "--server-url", url, "--enrolment-key", key,
             "--device-name", name, "--device-root", str(root), "--long-poll-seconds", "5", *arguments],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=PROCESS_STOP_TIMEOUT_SECONDS)


def test_agent_with_pinned_ca_enrols_over_tls(api, stack, tls_api_url, tls_files, tmp_path, unique_name):
    group = f"tls-{unique_name}"
    key = api.create_enrolment_key(group)["key"]
    name = f"tls-{unique_name}"
    root = tmp_path / name
    agent = start_enrolling_agent(tls_api_url, key, name, root, ["--ca-file", str(tls_files.ca_file)])
    try:
        deadline = time.monotonic() + ENROL_TIMEOUT_SECONDS
        while time.monotonic() < deadline and not any(device["id"] == name for device in api.list_devices(1000)):
            time.sleep(0.2)
        recipe = {"version": "1.0.0", "targets": {"groups": [group]},
                  "before": {"run": 'echo over tls > "$MICROUPDATES_DEVICE_ROOT/marker"'}}
        update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
        detail = wait_for_deployment(api, api.deploy(update["id"])["id"], timeout=60)
    finally:
        stop(agent)

    assert detail["status"] == "succeeded", detail
    assert (root / "marker").read_text() == "over tls\n"
    trust = json.loads((root / "var/lib/microupdates-agent/server_trust.json").read_text())
    # The TLS API process and the stack's API signed with the same key, from the shared data directory.
    assert trust["server_public_key"] == JobSigner.from_key_file(stack.data_dir / "job-signing-key.pem").public_key_text
    assert trust["device_id"] == name


def test_agent_without_ca_logs_certificate_error(api, tls_api_url, tmp_path, unique_name):
    key = api.create_enrolment_key(f"notls-{unique_name}")["key"]
    name = f"notls-{unique_name}"
    root = tmp_path / name
    agent = start_enrolling_agent(tls_api_url, key, name, root, [])
    log_path = root.parent / f"{name}.agent.log"
    try:
        deadline = time.monotonic() + AGENT_LOG_TIMEOUT_SECONDS
        while time.monotonic() < deadline and "TLS certificate" not in log_path.read_text():
            time.sleep(0.2)
        still_running = agent.poll() is None
    finally:
        stop(agent)

    log = log_path.read_text()
    assert f"Enrolment of {name} failed: POST /enrol failed: the server's TLS certificate was not accepted" in log
    assert "set ca_file to the CA bundle that signed it" in log
    assert "Traceback" not in log
    assert still_running, "the agent should keep retrying, not exit"
    assert not any(device["id"] == name for device in api.list_devices(1000))


def test_cli_verifies_server_with_ca_file(stack, tls_api_url, tls_files, tmp_path):
    environment = isolated_environment(
        tmp_path, MICROUPDATES_SERVER=tls_api_url, MICROUPDATES_API_KEY=stack.admin_api_key
    )

    pinned = invoke(["--ca-file", str(tls_files.ca_file), "devices", "list", "--json"], environment)
    from_environment = invoke(["devices", "list", "--json"],
                              {**environment, "MICROUPDATES_CA_FILE": str(tls_files.ca_file)})
    unpinned = invoke(["devices", "list"], environment)

    assert pinned.exit_code == 0, pinned.output
    assert isinstance(json.loads(pinned.stdout), list)
    assert from_environment.exit_code == 0, from_environment.output
    assert unpinned.exit_code == 1
    assert f"Cannot reach the API at {tls_api_url}" in unpinned.stderr
    assert "the server's TLS certificate was not accepted" in unpinned.stderr
    assert "--ca-file or MICROUPDATES_CA_FILE" in unpinned.stderr
    assert "Traceback" not in unpinned.output
