"""Signed jobs through the whole system: a job changed or re-sent between the API and the agent never runs.

A small HTTP proxy on 127.0.0.1 sits between a real agent and the real API
and rewrites or replays check-in responses, as an attacker on the network
path could.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microupdates.cli.local_fleet import LocalFleet
from tests.stack_helpers import wait_for_deployment, write_recipe

PROXY_TIMEOUT_SECONDS = 90.0
DEPLOYMENT_TIMEOUT_SECONDS = 120.0
FORWARDED_HEADERS = ("authorization", "content-type", "range")

# Receives a function that forwards the check-in to the API and returns its JSON body,
# and returns the body to send to the agent.
CheckInHandler = Callable[[Callable[[], dict]], dict]


class TamperingProxy:
    """Forward every request to the API; check-in responses go through `handle_check_in` first."""

    def __init__(self, upstream_url: str, handle_check_in: CheckInHandler) -> None:
        self.upstream = httpx.Client(base_url=upstream_url, timeout=PROXY_TIMEOUT_SECONDS)
        self.handle_check_in = handle_check_in
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._relay()

            def do_POST(self) -> None:
                self._relay()

            def log_message(self, *_args) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {name: value for name, value in self.headers.items() if name.lower() in FORWARDED_HEADERS}

                def forward() -> httpx.Response:
                    return proxy.upstream.request(self.command, self.path, content=body, headers=headers)

                try:
                    if self.path.endswith("/check-in"):
                        status, content = 200, json.dumps(proxy.handle_check_in(lambda: forward().json())).encode()
                        content_type = "application/json"
                    else:
                        response = forward()
                        status, content = response.status_code, response.content
                        content_type = response.headers.get("content-type", "application/octet-stream")
                except httpx.HTTPError as error:
                    # A long poll still open when the test stops the proxy ends here.
                    status, content, content_type = 502, str(error).encode(), "text/plain"

                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        return Handler


@pytest.fixture
def start_proxy(stack) -> Iterator[Callable[[CheckInHandler], TamperingProxy]]:
    proxies = []

    def start(handle_check_in: CheckInHandler) -> TamperingProxy:
        proxy = TamperingProxy(stack.api_url, handle_check_in)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def start_agent(api, server_url: str, devices_dir: Path, name: str, arguments: list[str] | None = None):
    fleet = LocalFleet(server_url=server_url, devices_dir=devices_dir, long_poll_seconds=5,
                       agent_arguments=arguments or [])
    device = fleet.add(name, api.register_device(name, groups=[name])["token"])
    fleet.start(device)
    return fleet, device


def deploy(api, tmp_path: Path, recipe: dict) -> dict:
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))
    return wait_for_deployment(api, api.deploy(update["id"])["id"], timeout=DEPLOYMENT_TIMEOUT_SECONDS)


def test_tampered_command_rejected_and_reported(api, start_proxy, tmp_path, unique_name):
    def rewrite_before_command(forward: Callable[[], dict]) -> dict:
        body = forward()
        job = body.get("job")
        if job and job["stage"] == "before":
            job["command"]["run"] = 'echo tampered > "$MICROUPDATES_DEVICE_ROOT/tampered"'
        return body

    proxy = start_proxy(rewrite_before_command)
    name = f"tamper-{unique_name}"
    fleet, device = start_agent(api, proxy.url, tmp_path / "devices", name)
    try:
        detail = deploy(api, tmp_path, {
            "version": "1.0.0", "targets": {"devices": [name]},
            "before": {"run": 'echo genuine > "$MICROUPDATES_DEVICE_ROOT/genuine"'},
            "rollback": {"command": 'echo rolled back > "$MICROUPDATES_DEVICE_ROOT/rollback"'},
        })
    finally:
        fleet.stop_all()

    row = detail["devices"][0]
    assert detail["status"] == "failed"
    # The untouched rollback job still runs: only the changed job is rejected.
    assert row["status"] == "rolled_back", row
    assert (device.root / "rollback").read_text() == "rolled back\n"
    assert row["stage"] == "before"
    assert "job signature check failed: the signature does not match the pinned server key" in row["error"]
    assert not (device.root / "tampered").exists()
    assert not (device.root / "genuine").exists()
    stage = api.read_device_result(detail["id"], name)["stages"][0]
    assert stage["status"] == "failed"
    assert stage["error"].startswith("job signature check failed: ")


def test_replayed_job_rejected_and_not_run_twice(api, start_proxy, tmp_path, unique_name):
    recorded: list[dict] = []
    replayed: list[dict] = []

    def replay_before_job(forward: Callable[[], dict]) -> dict:
        # The check-in after the recorded job gets that job again, without a request to the API.
        if recorded and not replayed:
            replayed.append(recorded[0])
            return recorded[0]
        body = forward()
        if body.get("job") and body["job"]["stage"] == "before":
            recorded.append(json.loads(json.dumps(body)))
        return body

    proxy = start_proxy(replay_before_job)
    name = f"replay-{unique_name}"
    fleet, device = start_agent(api, proxy.url, tmp_path / "devices", name)
    try:
        detail = deploy(api, tmp_path, {"version": "1.0.0", "targets": {"devices": [name]},
                                        "before": {"run": 'echo run >> "$MICROUPDATES_DEVICE_ROOT/runs"'},
                                        "after": {"run": "true"}})
    finally:
        fleet.stop_all()

    assert replayed, "the proxy never re-sent the before job"
    assert detail["status"] == "succeeded", detail
    assert (device.root / "runs").read_text() == "run\n"
    stages = api.read_device_result(detail["id"], name)["stages"]
    assert [stage["status"] for stage in stages if stage["stage"] == "before"] == ["succeeded"]
    log = device.log_path.read_text()
    assert f"not greater than the last accepted {recorded[0]['job']['sequence']}, so it is a replay" in log


def test_wrongly_pinned_key_rejects_every_job(api, stack, tmp_path, unique_name):
    raw_key = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    wrong_key = base64.b64encode(raw_key).decode()
    name = f"wrongkey-{unique_name}"
    fleet, device = start_agent(api, stack.api_url, tmp_path / "devices", name,
                                ["--server-public-key", wrong_key])
    try:
        detail = deploy(api, tmp_path, {"version": "1.0.0", "targets": {"devices": [name]},
                                        "before": {"run": 'echo ran > "$MICROUPDATES_DEVICE_ROOT/ran"'},
                                        "rollback": {"command": 'echo ran > "$MICROUPDATES_DEVICE_ROOT/rollback"'}})
    finally:
        fleet.stop_all()

    row = detail["devices"][0]
    assert detail["status"] == "failed"
    assert row["status"] == "rollback_failed", row
    assert f"job signature check failed: the signature does not match the pinned server key {wrong_key}" in row["error"]
    assert not (device.root / "ran").exists()
    assert not (device.root / "rollback").exists()
    stages = api.read_device_result(detail["id"], name)["stages"]
    assert stages, detail
    for stage in stages:
        assert stage["error"].startswith("job signature check failed: "), stage
