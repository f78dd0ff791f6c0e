"""Rollout options: parsing of limits and thresholds, phase validation, and the split of targets into phases."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from microupdates.rollout import PhaseSpec, RolloutOptions, assign_phases


@pytest.mark.parametrize(
    ("text", "per_second"),
    [(2, 2.0), (0.5, 0.5), ("5/s", 5.0), ("30/min", 0.5), ("3 / minute", 0.05)],
)
def test_start_rate_parses(text, per_second):
    assert RolloutOptions(max_start_rate=text).start_rate_per_second() == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["fast", "5/h", "0/s", -1])
def test_start_rate_rejects_invalid(text):
    with pytest.raises(ValidationError) as error:
        RolloutOptions(max_start_rate=text)

    assert "max_start_rate" in str(error.value)


@pytest.mark.parametrize(
    ("value", "limits"),
    [(3, (3, None)), ("3", (3, None)), ("20%", (None, 20.0)), ("0%", (None, 0.0)), (None, (None, None))],
)
def test_max_failures_parses(value, limits):
    assert RolloutOptions(max_failures=value).failure_limits() == limits


@pytest.mark.parametrize("value", ["many", "120%", -2])
def test_max_failures_rejects_invalid(value):
    with pytest.raises(ValidationError) as error:
        RolloutOptions(max_failures=value)

    assert "max_failures" in str(error.value)


def test_phase_accepts_single_name_shorthands():
    phase = PhaseSpec.model_validate({"group": "test", "tag": "lab", "device": "gw-1"})

    assert phase.groups == ["test"]
    assert phase.tags == ["lab"]
    assert phase.devices == ["gw-1"]
    assert phase.describe() == "group test; tag lab; device gw-1"


@pytest.mark.parametrize(
    "phase",
    [{}, {"group": "test", "percent": 10}, {"percent": 10, "rest": True}, {"soak_seconds": 60}],
)
def test_phase_needs_exactly_one_selector(phase):
    with pytest.raises(ValidationError) as error:
        PhaseSpec.model_validate(phase)

    assert "a phase selects its devices in exactly one way" in str(error.value)


def test_rest_phase_must_be_last():
    with pytest.raises(ValidationError) as error:
        RolloutOptions(phases=[{"rest": True}, {"group": "test"}])

    assert "phase 1 takes the rest of the targets" in str(error.value)


def test_assign_phases_without_plan_puts_all_in_first():
    assert assign_phases("dep-1", {"b", "a"}, [], {}, {}) == {"a": 0, "b": 0}


def test_assign_phases_follows_plan_order():
    device_ids = [f"gw-{number:02d}" for number in range(20)]
    groups_of = {"gw-03": {"test"}, "gw-07": {"test"}}
    tags_of = {"gw-11": {"lab"}}
    phases = [PhaseSpec(group="test"), PhaseSpec(tag="lab", device="gw-03"), PhaseSpec(percent=10), PhaseSpec(rest=True)]

    assigned = assign_phases("dep-1", device_ids, phases, groups_of, tags_of)

    by_phase = {index: sorted(d for d, phase in assigned.items() if phase == index) for index in range(4)}
    assert by_phase[0] == ["gw-03", "gw-07"]
    # gw-03 already belongs to the first phase.
    assert by_phase[1] == ["gw-11"]
    # 10% of all 20 targets, taken from the devices still free.
    assert len(by_phase[2]) == 2
    assert not set(by_phase[2]) & {"gw-03", "gw-07", "gw-11"}
    assert len(by_phase[3]) == 15
    assert sorted(assigned) == device_ids


def test_assign_phases_leaves_unselected_out():
    assigned = assign_phases("dep-1", ["a", "b", "c"], [PhaseSpec(device="b")], {}, {})

    assert assigned == {"b": 0}


def test_percent_phase_rounds_up_and_is_stable():
    device_ids = [f"gw-{number}" for number in range(7)]
    phases = [PhaseSpec(percent=10), PhaseSpec(rest=True)]

    first = assign_phases("dep-1", device_ids, phases, {}, {})
    again = assign_phases("dep-1", list(reversed(device_ids)), phases, {}, {})

    assert sum(1 for phase in first.values() if phase == 0) == 1
    assert first == again
