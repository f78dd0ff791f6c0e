"""HTTP client of the device API, with resumable artifact downloads."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from pathlib import Path
from typing import Optional

import httpx

from microupdates.protocol.device_api import (
    DEVICE_API_PREFIX,
    CheckInRequest,
    CheckInResponse,
    DeviceIdentity,
    DeviceFacts,
    EnrolRequest,
    EnrolResponse,
    ProgressReport,
    ProgressResponse,
    StageReport,
    TokenRotationResponse,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 30.0
DOWNLOAD_CHUNK_BYTES = 256 * 1024


class DeviceApiError(Exception):
    """Raised when the API cannot be reached or responds with an unexpected status."""

    def __init__(self, message: str, status_code: Optional[int] = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class CredentialsRejectedError(DeviceApiError):
    """Raised when the API responds with 401: the device token is unknown or revoked."""


class JobGoneError(DeviceApiError):
    """Raised when the API responds with 404 or 409 for a job: it ended on the server, so retrying is useless."""


class DeviceApiClient:
    def __init__(self, server_url: str, device_token: Optional[str] = None, verify: object = True) -> None:
        self.server_url = server_url.rstrip("/")
        self.device_token = device_token
        self._http = httpx.Client(
            base_url=self.server_url + DEVICE_API_PREFIX,
            timeout=httpx.Timeout(READ_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def enrol(self, enrolment_key: str, device_name: str, tags: list) -> EnrolResponse:
        body = EnrolRequest(enrolment_key=enrolment_key, device_name=device_name, tags=tags)
        response = self._request("POST", "/enrol", json=body.model_dump(), authenticated=False)
        return EnrolResponse.model_validate(response.json())

    def rotate_token(self) -> str:
        """Ask for a new device token; the current one stays valid until a request uses the new one."""

        response = self._request("POST", "/token/rotate", json={})
        return TokenRotationResponse.model_validate(response.json()).device_token

    def check_in(self, agent_version: str, wait_seconds: int, facts: Optional[DeviceFacts] = None) -> CheckInResponse:
        body = CheckInRequest(agent_version=agent_version, wait_seconds=wait_seconds, facts=facts)
        response = self._request(
            "POST", "/check-in", json=body.model_dump(exclude_none=True), read_timeout=wait_seconds + 15
        )
        received = response.json()
        check_in = CheckInResponse.model_validate(received)
        check_in.keep_received_job(received.get("job"))
        return check_in

    def read_identity(self) -> DeviceIdentity:
        response = self._request("GET", "/identity", json=None)
        return DeviceIdentity.model_validate(response.json())

    def report_progress(self, job_id: int, output_tail: str, wait_seconds: int) -> ProgressResponse:
        body = ProgressReport(output_tail=output_tail, wait_seconds=wait_seconds)
        response = self._request(
            "POST", "/jobs/%d/progress" % job_id, json=body.model_dump(), job=True, read_timeout=wait_seconds + 15
        )
        return ProgressResponse.model_validate(response.json())

    def report_stage(self, job_id: int, report: StageReport) -> None:
        self._request("POST", "/jobs/%d/report" % job_id, json=report.model_dump(mode="json"), job=True)

    def download_artifact(self, sha256: str, destination: Path) -> None:
        """Download into `destination`, resuming a partial file with a Range request, and verify the digest."""

        partial = destination.with_name(destination.name + ".part")
        offset = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": "bytes=%d-" % offset} if offset else {}
        headers.update(self._auth_headers())

        try:
            with self._http.stream("GET", "/artifacts/" + sha256, headers=headers) as response:
                if response.status_code == 416:
                    offset = 0
                    partial.unlink()
                    raise DeviceApiError("artifact %s: stored partial download was invalid; retry" % sha256)
                if response.status_code not in (200, 206):
                    raise DeviceApiError(
                        "downloading artifact %s failed with HTTP %d" % (sha256, response.status_code),
                        response.status_code,
                    )
                mode = "ab" if response.status_code == 206 else "wb"
                with open(partial, mode) as output:
                    for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                        output.write(chunk)
                    output.flush()
                    os.fsync(output.fileno())
        except httpx.HTTPError as error:
            raise DeviceApiError("downloading artifact %s failed: %s" % (sha256, error)) from error

        actual = file_sha256(partial)
        if actual != sha256:
            partial.unlink()
            raise DeviceApiError("artifact checksum mismatch: expected %s, got %s" % (sha256, actual))
        os.replace(partial, destination)

    def _auth_headers(self) -> dict:
        return {"Authorization": "Bearer " + self.device_token} if self.device_token else {}

    def _request(
        self, method: str, path: str, *, json: Optional[dict], authenticated: bool = True,
        read_timeout: Optional[float] = None, job: bool = False,
    ) -> httpx.Response:
        headers = self._auth_headers() if authenticated else {}
        timeout = None
        if read_timeout is not None:
            timeout = httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_SECONDS)
        try:
            if timeout is not None:
                response = self._http.request(method, path, json=json, headers=headers, timeout=timeout)
            else:
                response = self._http.request(method, path, json=json, headers=headers)
        except httpx.ConnectError as error:
            raise DeviceApiError("%s %s failed: %s" % (method, path, describe_connect_error(error))) from error
        except httpx.HTTPError as error:
            raise DeviceApiError("%s %s failed: %s" % (method, path, error)) from error

        if response.status_code == 401:
            raise CredentialsRejectedError(error_detail(response), 401)
        if job and response.status_code in (404, 409):
            raise JobGoneError(error_detail(response), response.status_code)
        if response.status_code >= 400:
            raise DeviceApiError(
                "%s %s: HTTP %d: %s" % (method, path, response.status_code, error_detail(response)),
                response.status_code,
            )
        return response


def describe_connect_error(error: httpx.ConnectError) -> str:
    """Return the connection error, with what to do when the server's TLS certificate did not verify."""

    if isinstance(error.__context__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(error):
        return (
            "the server's TLS certificate was not accepted (%s); set ca_file to the CA bundle that "
            "signed it" % error
        )
    return str(error)


def error_detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return str(detail) if detail else response.text[:500]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()
