"""Secrets referenced by recipes reach the device's command and nothing else: not Temporal, the database or logs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid

import pytest
from sqlalchemy import select
from temporalio.client import Client

from microupdates.cli.api_client import OperatorApiError
from microupdates.db.models import StageJob, Update
from microupdates.db.session import Database
from microupdates.device_agent.client import DeviceApiClient
from microupdates.protocol.device_api import StageReport, StepResult
from microupdates.workflows.contracts import deployment_workflow_id
from tests.stack_helpers import wait_for_deployment, write_recipe


def start_device(api, fleet, name: str):
    device = fleet.add(name, api.register_device(name, groups=[name])["token"])
    fleet.start(device)
    return device


def decoded_strings(node) -> list[str]:
    """Return every string in a JSON document, plus the base64-decoded text of those that are base64 (payloads)."""

    found = []
    if isinstance(node, dict):
        for value in node.values():
            found.extend(decoded_strings(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(decoded_strings(value))
    elif isinstance(node, str):
        found.append(node)
        try:
            found.append(base64.b64decode(node, validate=True).decode("utf-8", errors="replace"))
        except (binascii.Error, ValueError):
            pass
    return found


async def workflow_history_texts(stack, workflow_ids: list[str]) -> list[str]:
    client = await Client.connect(stack.temporal_address)
    texts = []
    for workflow_id in workflow_ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        texts.extend(decoded_strings(json.loads(history.to_json())))
    return texts


def stored_rows_text(stack, deployment_id: str) -> str:
    database = Database(f"sqlite:///{(stack.data_dir / 'microupdates.db').resolve()}")
    try:
        with database.session() as session:
            jobs = session.scalars(select(StageJob).where(StageJob.deployment_id == deployment_id)).all()
            updates = session.scalars(select(Update)).all()
            return json.dumps([job.report for job in jobs] + [update.recipe for update in updates])
    finally:
        database.dispose()


def test_secret_reaches_command_and_nothing_else(api, fleet, stack, tmp_path, unique_name):
    name = f"secret-{unique_name}"
    secret_name = f"DB_PASSWORD_{unique_name}"
    value = f"s3cr3t-{uuid.uuid4().hex}"
    device = start_device(api, fleet, name)
    api.set_secret(secret_name, value)
    command = (
        f'printf "%s" "${{secret:{secret_name}}}" > "$MICROUPDATES_DEVICE_ROOT/seen.txt"\n'
        f'echo "password is ${{secret:{secret_name}}}"\n'
        f'echo "failing with ${{secret:{secret_name}}}" >&2\n'
        "exit 3\n"
    )
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "after": {"run": command},
              "rollback": {"command": f'echo "rollback sees ${{secret:{secret_name}}}"'}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    deployment_id = detail["id"]
    result = api.read_device_result(deployment_id, name)
    reported = json.dumps(result)
    history = asyncio.run(workflow_history_texts(
        stack, [deployment_workflow_id(deployment_id), f"{deployment_workflow_id(deployment_id)}-device-{name}"]))
    api_log = (stack.data_dir / "api.log").read_text(errors="replace")
    assert (device.root / "seen.txt").read_text() == value
    assert detail["devices"][0]["status"] == "rolled_back"
    assert "password is ***" in reported
    assert "failing with ***" in reported
    assert "rollback sees ***" in reported
    assert value not in reported
    # The decoded payloads are searched too: DeploymentInput's JSON shows up only after decoding.
    assert any('"deployment_id"' in text for text in history)
    assert not [text for text in history if value in text]
    assert value not in stored_rows_text(stack, deployment_id)
    assert f"${{secret:{secret_name}}}" in stored_rows_text(stack, deployment_id)
    assert value not in api_log


def test_server_masks_secret_an_agent_reported(api, stack, tmp_path, unique_name):
    name = f"unmasked-{unique_name}"
    secret_name = f"API_KEY_{unique_name}"
    value = f"key-{uuid.uuid4().hex}"
    token = api.register_device(name, groups=[name])["token"]
    api.set_secret(secret_name, value)
    recipe = {"version": "1.0.0", "targets": {"devices": [name]}, "before": {"run": f"echo ${{secret:{secret_name}}}"}}
    deployment = api.deploy(api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))["id"])
    client = DeviceApiClient(stack.api_url, token)
    try:
        job = None
        deadline = time.monotonic() + 60
        while job is None and time.monotonic() < deadline:
            job = client.check_in("test", 5).job
        assert job is not None
        # An agent that does not mask, such as one older than secrets.
        client.report_stage(job.job_id, StageReport(status="succeeded", exit_code=0, steps=[
            StepResult(name="before", exit_code=0, output=f"{value}\n")]))
    finally:
        client.close()

    detail = wait_for_deployment(api, deployment["id"], timeout=60)

    assert job.secrets == {secret_name: value}
    assert job.command.run == f"echo ${{secret:{secret_name}}}"
    assert detail["status"] == "succeeded"
    reported = json.dumps(api.read_device_result(deployment["id"], name))
    assert "***" in reported
    assert value not in reported
    assert value not in stored_rows_text(stack, deployment["id"])


def test_deployment_with_unknown_secret_is_rejected(api, tmp_path, unique_name):
    name = f"nosecret-{unique_name}"
    api.register_device(name, groups=[name])
    api.set_secret(f"KNOWN_{unique_name}", "value")
    recipe = {"version": "1.0.0", "targets": {"devices": [name]},
              "before": {"run": f"echo ${{secret:KNOWN_{unique_name}}} ${{secret:MISSING_{unique_name}}}"}}
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    with pytest.raises(OperatorApiError) as raised:
        api.deploy(update["id"])

    assert raised.value.status_code == 422
    assert str(raised.value).endswith(
        f"The recipe references unknown secret(s) MISSING_{unique_name}; "
        "set each with PUT /api/v1/secrets/NAME, then deploy again."
    )


def test_secret_values_are_never_listed(api, unique_name):
    secret_name = f"LISTED_{unique_name}"
    api.set_secret(secret_name, "do-not-show")
    api.set_secret(secret_name, "replaced")

    listed = [row for row in api.list_secrets() if row["name"] == secret_name]
    api.delete_secret(secret_name)

    assert len(listed) == 1
    assert set(listed[0]) == {"name", "created_at", "updated_at"}
    assert secret_name not in [row["name"] for row in api.list_secrets()]
    with pytest.raises(OperatorApiError, match=f"HTTP 404: Secret '{secret_name}' not found."):
        api.delete_secret(secret_name)


def test_invalid_secret_name_is_rejected(api):
    with pytest.raises(OperatorApiError, match="HTTP 422: '1bad' is not a valid secret name"):
        api.set_secret("1bad", "value")


def test_oversized_secret_value_is_not_echoed(api, unique_name):
    value = "v" * (64 * 1024 + 1)

    with pytest.raises(OperatorApiError) as raised:
        api.set_secret(f"BIG_{unique_name}", value)

    assert raised.value.status_code == 422
    assert str(raised.value).endswith(f"The value of secret 'BIG_{unique_name}' is 65537 bytes; "
                                      "it must be 1 to 65536 bytes.")
    assert "vvvv" not in str(raised.value)
