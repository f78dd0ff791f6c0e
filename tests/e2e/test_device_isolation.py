"""A device reaches only its own jobs and the artifacts its own running jobs use.

The test walks the device router's routes, so an endpoint added later with a
job id or artifact hash in its path is covered without changing the test.
"""

from __future__ import annotations

import hashlib
import re
import time

import httpx

from microupdates.api.routes.device_agent import router
from microupdates.device_agent.client import DeviceApiClient
from microupdates.protocol.device_api import DEVICE_API_PREFIX, ProgressReport, StageJob, StageReport
from tests.stack_helpers import wait_for_deployment, write_recipe

# A valid body for each request model of the device routes; a route with a
# model missing here fails the test with a message naming it.
EXAMPLE_BODIES = {
    ProgressReport: {"output_tail": "", "wait_seconds": 0},
    StageReport: {"status": "failed", "error": "not mine"},
}
UNKNOWN_JOB_ID = "2147483647"
UNKNOWN_SHA256 = "0" * 64


def device_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_for_job(client: DeviceApiClient, timeout: float = 60) -> StageJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.check_in("test", 5).job
        if job is not None:
            return job
    raise AssertionError(f"no job arrived within {timeout} s")


def path_routes_with_ids() -> list:
    routes = [route for route in router.routes if re.search(r"\{(job_id|sha256)\}", route.path)]
    assert routes, "the device router has no route with a job id or artifact hash"
    return routes


def call_route(stack, route, values: dict[str, str], token: str) -> httpx.Response:
    path = route.path.format(**values)
    body_field = getattr(route, "body_field", None)
    body = None
    if body_field is not None:
        model = body_field.type_ if hasattr(body_field, "type_") else body_field.field_info.annotation
        assert model in EXAMPLE_BODIES, f"add an example body for {model.__name__} (route {route.path})"
        body = EXAMPLE_BODIES[model]
    (method,) = route.methods
    return httpx.request(method, f"{stack.api_url}{DEVICE_API_PREFIX}{path}", json=body,
                         headers=device_headers(token), timeout=30)


def test_other_device_sees_nothing_of_a_devices_jobs(api, stack, tmp_path, unique_name):
    owner, stranger = f"owner-{unique_name}", f"stranger-{unique_name}"
    owner_token = api.register_device(owner, groups=[owner])["token"]
    stranger_token = api.register_device(stranger, groups=[stranger])["token"]
    content = f"private to {owner}\n".encode()
    sha256 = hashlib.sha256(content).hexdigest()
    recipe = {"version": "1.0.0", "targets": {"devices": [owner]},
              "files": [{"source": "app.txt", "destination": "/opt/isolation/app.txt"}]}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe, {"app.txt": content}))
    deployment = api.deploy(update["id"])

    owner_client = DeviceApiClient(stack.api_url, owner_token)
    try:
        job = wait_for_job(owner_client)
        owner_download = httpx.get(f"{stack.api_url}{DEVICE_API_PREFIX}/artifacts/{sha256}",
                                   headers=device_headers(owner_token))

        stranger_check_in = httpx.post(f"{stack.api_url}{DEVICE_API_PREFIX}/check-in",
                                       json={"agent_version": "test", "wait_seconds": 0},
                                       headers=device_headers(stranger_token))
        owned = {"job_id": str(job.job_id), "sha256": sha256}
        unknown = {"job_id": UNKNOWN_JOB_ID, "sha256": UNKNOWN_SHA256}
        results = []
        for route in path_routes_with_ids():
            results.append((route.path, call_route(stack, route, owned, stranger_token),
                            call_route(stack, route, unknown, stranger_token)))

        owner_client.report_stage(job.job_id, StageReport(status="succeeded", exit_code=0))
    finally:
        owner_client.close()

    assert job.stage == "files"
    assert owner_download.status_code == 200
    assert owner_download.content == content
    assert stranger_check_in.json()["job"] is None
    for path, foreign, missing in results:
        foreign_text = re.sub(rf"\b{job.job_id}\b", "ID", foreign.text.replace(sha256, "ID"))
        missing_text = re.sub(rf"\b{UNKNOWN_JOB_ID}\b", "ID", missing.text.replace(UNKNOWN_SHA256, "ID"))
        assert foreign.status_code == 404, f"{path}: {foreign.status_code} {foreign.text}"
        assert foreign_text == missing_text, f"{path}: {foreign.text!r} differs from {missing.text!r}"
    assert wait_for_deployment(api, deployment["id"], timeout=60)["status"] == "succeeded"


def test_artifact_of_finished_job_is_not_found(api, stack, tmp_path, unique_name):
    name = f"finished-{unique_name}"
    token = api.register_device(name, groups=[name])["token"]
    content = f"done on {name}\n".encode()
    sha256 = hashlib.sha256(content).hexdigest()
    recipe = {"version": "1.0.0", "targets": {"devices": [name]},
              "files": [{"source": "app.txt", "destination": "/opt/isolation/app.txt"}]}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe, {"app.txt": content}))
    deployment = api.deploy(update["id"])
    client = DeviceApiClient(stack.api_url, token)
    try:
        job = wait_for_job(client)
        client.report_stage(job.job_id, StageReport(status="succeeded", exit_code=0))
    finally:
        client.close()

    after = httpx.get(f"{stack.api_url}{DEVICE_API_PREFIX}/artifacts/{sha256}", headers=device_headers(token))

    assert after.status_code == 404
    assert after.json() == {"detail": f"Artifact {sha256!r} not found."}
    assert wait_for_deployment(api, deployment["id"], timeout=60)["status"] == "succeeded"
