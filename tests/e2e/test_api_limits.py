"""Size limits and unsafe archives: the API rejects them with 413 or 422 naming the limit and the value.

Small limits run on a second API process started here. It shares the test
stack's Temporal server but has its own data directory, so only requests
that need no worker are sent to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import io
import json
import logging
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator

import httpx
import pytest

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.stack import free_port
from microupdates.device_agent.agent import Agent
from microupdates.device_agent.client import DeviceApiClient, DeviceApiError, JobGoneError
from microupdates.device_agent.config import AgentConfig
from microupdates.device_agent.output import shrink_report
from microupdates.protocol.device_api import MAX_REPORTED_OUTPUT_BYTES, StageJob, StageReport, StepResult
from microupdates.settings import DEFAULT_MAX_REQUEST_BODY_BYTES
from tests.stack_helpers import operator_headers

SMALL_BODY_BYTES = 16 * 1024
SMALL_RECIPE_BYTES = 2048
SMALL_ARTIFACT_BYTES = 64 * 1024
API_START_SECONDS = 60



@dataclass
class SmallLimitsApi:
    url: str
    admin_key: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


@pytest.fixture(scope="module")
def small_api(stack, tmp_path_factory) -> Iterator[SmallLimitsApi]:
    """Start an API process with small limits and a database of its own next to the stack's, with an admin key."""

    port = free_port()
    data_dir = tmp_path_factory.mktemp("small-limits")
    env = stack.server_env()
    env.update(
        MICROUPDATES_DATA_DIR=str(data_dir),
        MICROUPDATES_DATABASE_URL="",
        MICROUPDATES_API_PORT=str(port),
        MICROUPDATES_MAX_REQUEST_BODY_BYTES=str(SMALL_BODY_BYTES),
        MICROUPDATES_MAX_RECIPE_BYTES=str(SMALL_RECIPE_BYTES),
        MICROUPDATES_MAX_ARTIFACT_BYTES=str(SMALL_ARTIFACT_BYTES),
    )
    admin_key = subprocess.run(
        [sys.executable, "-m", "microupdates.api.main", "api-keys", "create", "--role", "admin", "--name", "limits"],
        env=env, capture_output=True, text=True, check=True, timeout=API_START_SECONDS,
    ).stdout.strip()
    log = open(data_dir / "api.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "microupdates.api.main"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + API_START_SECONDS
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the small-limits API did not start: {(data_dir / 'api.log').read_text()}")
            time.sleep(0.2)
        yield SmallLimitsApi(url, admin_key)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member, content in members:
            member.size = len(content) if member.isreg() else 0
            archive.addfile(member, io.BytesIO(content) if member.isreg() else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


UNSAFE_ARCHIVES = [
    ("absolute", (member("/etc/cron.d/evil"), b"x"), "archive member '/etc/cron.d/evil' has an absolute path"),
    ("dot-dot", (member("app/../../evil"), b"x"), "archive member 'app/../../evil' contains '..'"),
    (
        "symlink-out",
        (member("link", tarfile.SYMTYPE, "../../etc"), b""),
        "archive member 'link' is a symbolic link to '../../etc', outside the destination",
    ),
    (
        "symlink-absolute",
        (member("link", tarfile.SYMTYPE, "/etc/passwd"), b""),
        "archive member 'link' is a symbolic link to the absolute path '/etc/passwd'",
    ),
    (
        "hardlink-out",
        (member("hard", tarfile.LNKTYPE, "../outside"), b""),
        "archive member 'hard' is a hard link to '../outside', outside the destination",
    ),
    ("device", (member("null", tarfile.CHRTYPE), b""), "archive member 'null' is a device file or FIFO"),
    ("fifo", (member("pipe", tarfile.FIFOTYPE), b""), "archive member 'pipe' is a device file or FIFO"),
]


@pytest.mark.parametrize("label, entry, expected", UNSAFE_ARCHIVES, ids=[case[0] for case in UNSAFE_ARCHIVES])
def test_upload_directory_archive_rejects_unsafe_member(stack, api, label, entry, expected):
    content = tar_bytes((member("app/ok.txt"), b"fine"), entry)

    response = httpx.post(
        f"{stack.api_url}/api/v1/artifacts", params={"kind": "directory"}, content=content,
        headers=operator_headers(stack),
    )

    assert response.status_code == 422
    assert response.json()["detail"] == (
        f"The directory archive is unsafe: {expected}; pack the directory again."
    )


def test_upload_directory_artifact_rejects_non_archive(stack, api):
    response = httpx.post(
        f"{stack.api_url}/api/v1/artifacts", params={"kind": "directory"}, content=b"not a tar file",
        headers=operator_headers(stack),
    )

    assert response.status_code == 422
    assert response.json()["detail"].startswith("The directory artifact is not a readable tar archive")


def test_create_update_rejects_unsafe_directory_artifact(stack, api):
    content = tar_bytes((member("link", tarfile.SYMTYPE, "../../etc"), b""))
    sha256 = api.upload_artifact(content)
    recipe = {
        "version": "1.0.0",
        "files": [{"source": "app", "destination": "/opt/app", "kind": "directory", "artifact": sha256}],
    }

    response = httpx.post(f"{stack.api_url}/api/v1/updates", json={"recipe": recipe}, headers=operator_headers(stack))

    assert response.status_code == 422
    assert response.json()["detail"] == (
        "files[0] (app): The directory archive is unsafe: archive member 'link' is a symbolic link to "
        "'../../etc', outside the destination; pack the directory again."
    )


def test_request_body_over_default_limit_is_413(stack, api):
    body = json.dumps({"name": "x" * DEFAULT_MAX_REQUEST_BODY_BYTES}).encode()

    response = httpx.post(
        f"{stack.api_url}/api/v1/devices", content=body,
        headers={**operator_headers(stack), "content-type": "application/json"},
    )

    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"The request body is {len(body)} bytes, over the limit of {DEFAULT_MAX_REQUEST_BODY_BYTES} bytes; "
        "send less, or raise MICROUPDATES_MAX_REQUEST_BODY_BYTES on the server."
    )


def test_chunked_body_over_limit_is_413(small_api):
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(SMALL_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(
        f"{small_api.url}/api/v1/devices", content=chunks(),
        headers={**small_api.headers(), "content-type": "application/json"},
    )

    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"The request body is more than {SMALL_BODY_BYTES} bytes, over the limit of {SMALL_BODY_BYTES} bytes; "
        "send less, or raise MICROUPDATES_MAX_REQUEST_BODY_BYTES on the server."
    )


def test_declared_artifact_over_limit_is_rejected_before_reading(stack):
    """A 3 GiB Content-Length gets 413 at once: the API responds before a byte of the body is sent."""

    host, port = stack.api_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /api/v1/artifacts HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 3221225472\r\n\r\n"
        )
        # The API closes the connection after the 413, so reading to the end gets the whole response.
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        response = received.decode()

    assert response.startswith("HTTP/1.1 413 ")
    assert "over the limit of 2147483648 bytes" in response
    assert "MICROUPDATES_MAX_ARTIFACT_BYTES" in response


def test_streamed_artifact_over_limit_is_413(small_api):
    def chunks() -> Iterator[bytes]:
        for _ in range(SMALL_ARTIFACT_BYTES // 4096 + 2):
            yield b"a" * 4096

    response = httpx.post(f"{small_api.url}/api/v1/artifacts", content=chunks(), headers=small_api.headers())

    assert response.status_code == 413
    assert f"more than {SMALL_ARTIFACT_BYTES} bytes" in response.json()["detail"]
    assert "MICROUPDATES_MAX_ARTIFACT_BYTES" in response.json()["detail"]


def test_artifact_at_limit_is_stored(small_api):
    response = httpx.post(
        f"{small_api.url}/api/v1/artifacts", content=b"b" * SMALL_ARTIFACT_BYTES, headers=small_api.headers()
    )

    assert response.status_code == 201
    assert response.json()["size_bytes"] == SMALL_ARTIFACT_BYTES


def test_recipe_over_limit_is_422(small_api):
    recipe = {"version": "1.0.0", "before": {"run": "echo " + "y" * SMALL_RECIPE_BYTES}}

    response = httpx.post(f"{small_api.url}/api/v1/updates", json={"recipe": recipe}, headers=small_api.headers())

    size = len(json.dumps(
        {"version": "1.0.0", "comment": "", "targets": {"devices": [], "groups": [], "tags": []},
         "before": {"run": recipe["before"]["run"], "timeout_seconds": 300}},
        separators=(",", ":"),
    ))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("The recipe is ")
    assert f"over the limit of {SMALL_RECIPE_BYTES} bytes (MICROUPDATES_MAX_RECIPE_BYTES)" in detail
    assert int(detail.split()[3]) >= size


@pytest.fixture
def device_token(api, unique_name) -> str:
    return api.register_device(f"output-{unique_name}", groups=[f"output-{unique_name}"])["token"]


def test_report_with_step_output_over_limit_is_413(stack, device_token):
    output = "z" * (MAX_REPORTED_OUTPUT_BYTES + 1)
    report = {"status": "failed", "steps": [{"name": "before", "output": output}]}

    response = httpx.post(
        f"{stack.api_url}/device/v1/jobs/1/report", json=report, headers={"Authorization": f"Bearer {device_token}"}
    )

    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"steps[0].output (before) is {MAX_REPORTED_OUTPUT_BYTES + 1} bytes, over the limit of "
        f"{MAX_REPORTED_OUTPUT_BYTES} bytes of reported output; "
        "cut the output to its first and last bytes and set output_truncated."
    )


def test_progress_with_output_over_limit_is_413(stack, device_token):
    body = {"output_tail": "z" * (MAX_REPORTED_OUTPUT_BYTES + 1), "wait_seconds": 0}

    response = httpx.post(
        f"{stack.api_url}/device/v1/jobs/1/progress", json=body, headers={"Authorization": f"Bearer {device_token}"}
    )

    assert response.status_code == 413
    assert response.json()["detail"].startswith(f"output_tail is {MAX_REPORTED_OUTPUT_BYTES + 1} bytes")


def test_shrunk_report_passes_the_limit_that_rejected_it(small_api):
    """A report the small-limits API rejects with 413 gets through once shrink_report cut its output."""

    operator = OperatorApiClient(small_api.url, small_api.admin_key)
    token = operator.register_device("shrink-1", groups=["shrink"])["token"]
    operator.close()
    report = StageReport(status="failed", steps=[StepResult(name="after", output="w" * (2 * SMALL_BODY_BYTES))])
    client = DeviceApiClient(small_api.url, token)
    try:
        with pytest.raises(DeviceApiError) as rejected:
            client.report_stage(1, report)
        shrunk = shrink_report(report, 4096)
        # Job 1 does not exist on this API, so a report that passes the size limit gets 404.
        with pytest.raises(JobGoneError):
            client.report_stage(1, shrunk)
    finally:
        client.close()

    assert rejected.value.status_code == 413
    assert shrunk.steps[0].output_truncated
    assert shrunk.steps[0].output.startswith(f"[... {2 * SMALL_BODY_BYTES - 4096} bytes cut ...]\n")
    assert shrunk.steps[0].output.endswith("w" * 4096)


def test_shrink_report_keeps_short_output():
    step = StepResult(name="before", output="short\n")

    shrunk = shrink_report(StageReport(status="succeeded", steps=[step]), 4096)

    assert shrunk.steps == [step]


def test_shrink_report_to_zero_drops_output():
    report = StageReport(status="failed", steps=[StepResult(name="before", output="x" * 100)])

    shrunk = shrink_report(report, 0)

    assert shrunk.steps[0].output == "[... 100 bytes cut ...]\n"
    assert shrunk.steps[0].output_truncated



def test_agent_resends_report_with_shorter_output_after_413(small_api, tmp_path, caplog):
    operator = OperatorApiClient(small_api.url, small_api.admin_key)
    token = operator.register_device("shrink-2", groups=["shrink"])["token"]
    operator.close()
    (tmp_path / "state").mkdir()
    agent = Agent(AgentConfig(server_url=small_api.url, device_token=token, state_dir=tmp_path / "state"))
    agent.client.device_token = token
    job = StageJob(job_id=1, deployment_id="dep-x", device_id="shrink-2", update_version="1.0.0", stage="after",
                   progress_interval_seconds=5)
    report = StageReport(status="failed", steps=[StepResult(name="after", output="w" * (2 * SMALL_BODY_BYTES))])

    with caplog.at_level(logging.WARNING, logger="microupdates.device_agent.agent"):
        try:
            agent._deliver_report(job, report)
        finally:
            agent.client.close()

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "report too large" in messages[0]
    assert "sending it with at most 4096 bytes of output per step" in messages[0]
    # Job 1 does not exist on this API, so the shorter report reaches the route and gets 404.
    assert "the server no longer takes its report" in messages[1]
