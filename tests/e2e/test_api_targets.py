"""Target errors: each bad device name, target or update id gets a 4xx that names the value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from microupdates.cli.api_client import OperatorApiClient, OperatorApiError
from tests.stack_helpers import write_recipe


@dataclass
class Setup:
    """What each case may use: a registered device in its own group and tag, and an update with no targets."""

    api: OperatorApiClient
    suffix: str
    device: str
    update_id: str


@dataclass
class TargetCase:
    label: str
    request: Callable[[Setup], object]
    status_code: int
    message: Callable[[Setup], str]


TARGET_CASES = [
    TargetCase(
        "duplicate device name",
        lambda s: s.api.register_device(s.device, groups=[f"g-{s.suffix}"]),
        409,
        lambda s: f"A device named '{s.device}' already exists; choose another name or remove it first.",
    ),
    TargetCase(
        "deploy unknown update",
        lambda s: s.api.deploy(f"upd-missing-{s.suffix}", devices=[s.device]),
        404,
        lambda s: f"Update 'upd-missing-{s.suffix}' not found.",
    ),
    TargetCase(
        "empty target",
        lambda s: s.api.deploy(s.update_id),
        422,
        lambda s: "The target is empty: name at least one device, group or tag.",
    ),
    TargetCase(
        "unknown device",
        lambda s: s.api.deploy(s.update_id, devices=[s.device, f"ghost-{s.suffix}"]),
        422,
        lambda s: f"Unknown devices in the target: ['ghost-{s.suffix}']. Register them first.",
    ),
    TargetCase(
        "unknown group",
        lambda s: s.api.deploy(s.update_id, groups=[f"nogroup-{s.suffix}"]),
        422,
        lambda s: f"Unknown group in the target: 'nogroup-{s.suffix}' has no devices.",
    ),
    TargetCase(
        "unknown tag",
        lambda s: s.api.deploy(s.update_id, tags=[f"notag-{s.suffix}"]),
        422,
        lambda s: f"Unknown tag in the target: no device has the tag 'notag-{s.suffix}'.",
    ),
    TargetCase(
        "device listed twice",
        lambda s: s.api.deploy(s.update_id, devices=[s.device, s.device]),
        422,
        lambda s: f"targets.devices: lists a name twice: ['{s.device}']",
    ),
    TargetCase(
        "invalid device name in target",
        lambda s: s.api.deploy(s.update_id, devices=["GW 1"]),
        422,
        lambda s: "targets.devices.0: 'GW 1' is not a valid name: use 1-63 lower-case letters, digits, '.', '_' "
                  "or '-', starting with a letter or digit",
    ),
    TargetCase(
        "invalid device name",
        lambda s: s.api.register_device("-gw", groups=[]),
        422,
        lambda s: "name: '-gw' is not a valid name: use 1-63 lower-case letters, digits, '.', '_' or '-', "
                  "starting with a letter or digit",
    ),
    TargetCase(
        "read unknown device",
        lambda s: s.api.read_device(f"ghost-{s.suffix}"),
        404,
        lambda s: f"Device 'ghost-{s.suffix}' not found.",
    ),
]


@pytest.fixture
def setup(api, tmp_path, unique_name) -> Setup:
    device = f"target-{unique_name}"
    api.register_device(device, groups=[f"target-{unique_name}"], tags=[f"target-{unique_name}"])
    recipe_path = write_recipe(tmp_path / "recipe", {"version": "1.0.0", "before": {"run": "true"}})
    update_id = api.create_update_from_file(recipe_path)["id"]
    return Setup(api=api, suffix=unique_name, device=device, update_id=update_id)


@pytest.mark.parametrize("case", TARGET_CASES, ids=[case.label for case in TARGET_CASES])
def test_target_error_names_value(setup, case):
    with pytest.raises(OperatorApiError) as raised:
        case.request(setup)

    assert raised.value.status_code == case.status_code
    assert str(raised.value).endswith(f"failed with HTTP {case.status_code}: {case.message(setup)}")
