"""A deployment's rollout options: concurrency and start-rate limits, failure threshold, and phases.

The options are stored with the deployment. When the targets are frozen,
`assign_phases` puts each device into one phase; the workflow then only
needs each phase's gate, soak time and device count.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from typing import Any, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from microupdates.protocol.recipe import ResourceName

DEFAULT_MAX_CONCURRENT = 500
# The window stays well below Temporal's 2,000 pending children per execution.
MAX_CONCURRENT_LIMIT = 1000
MAX_PHASES = 20
MAX_SOAK_SECONDS = 30 * 24 * 3600
START_RATE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute)\s*\Z")
FAILURES_PERCENT_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*\Z")


class PhaseSpec(BaseModel):
    """One phase of a rollout plan: which of the frozen targets it updates, and the gate to the next phase.

    A phase selects by `groups`, `tags` and `devices` (their union), by
    `percent` of the whole target set, or takes the `rest`. It chooses only
    among devices that no earlier phase took.
    """

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = Field(default=None, max_length=63)
    groups: List[ResourceName] = Field(default_factory=list)
    tags: List[ResourceName] = Field(default_factory=list)
    devices: List[ResourceName] = Field(default_factory=list)
    percent: Optional[float] = Field(default=None, gt=0, le=100, description="Share of all targets, rounded up.")
    rest: bool = Field(default=False, description="Every target that no earlier phase took.")
    min_success_rate: float = Field(
        default=100, ge=0, le=100, description="Percentage of this phase's finished devices that must succeed before the next."
    )
    soak_seconds: int = Field(default=0, ge=0, le=MAX_SOAK_SECONDS, description="Wait after the gate passed.")

    @model_validator(mode="before")
    @classmethod
    def expand_single_names(cls, data: Any) -> Any:
        """Accept `group`, `tag` and `device` as shorthands for a one-element list."""

        if isinstance(data, dict):
            data = dict(data)
            for single, plural in (("group", "groups"), ("tag", "tags"), ("device", "devices")):
                if single in data:
                    value = data.pop(single)
                    data[plural] = list(data.get(plural) or []) + [value]
        return data

    @model_validator(mode="after")
    def check_one_selector(self) -> PhaseSpec:
        kinds = [
            kind for kind, given in (
                ("groups/tags/devices", bool(self.groups or self.tags or self.devices)),
                ("percent", self.percent is not None),
                ("rest", self.rest),
            ) if given
        ]
        if len(kinds) != 1:
            raise ValueError(
                "a phase selects its devices in exactly one way: by groups/tags/devices, by percent, "
                f"or with rest: true; this one uses {', '.join(kinds) or 'none'}"
            )
        return self

    def describe(self) -> str:
        if self.rest:
            return "rest"
        if self.percent is not None:
            return f"{self.percent:g}%"
        parts = [f"{label} {', '.join(names)}" for label, names in (
            ("group", self.groups), ("tag", self.tags), ("device", self.devices)) if names]
        return "; ".join(parts)


class RolloutOptions(BaseModel):
    """Limits, stop rule and phases of a deployment; every field is optional."""

    max_concurrent: int = Field(
        default=DEFAULT_MAX_CONCURRENT, ge=1, le=MAX_CONCURRENT_LIMIT, description="Devices updating at once."
    )
    max_start_rate: Optional[Union[float, str]] = Field(
        default=None,
        description="Devices started per second, as a number or as `N/s` or `N/min`; no limit when omitted.",
    )
    max_failures: Optional[Union[int, str]] = Field(
        default=None,
        description="Failed devices that stop the rollout when exceeded: a count (`3`) or a share of the "
        "finished devices (`20%`). No threshold when omitted.",
    )
    min_finished: int = Field(
        default=1, ge=1, description="Finished devices needed before the failure threshold is evaluated."
    )
    phases: List[PhaseSpec] = Field(
        default_factory=list, max_length=MAX_PHASES, description="Ordered phases; one phase of every target when empty."
    )

    @field_validator("max_start_rate")
    @classmethod
    def check_start_rate(cls, value: Union[float, str, None]) -> Union[float, str, None]:
        if value is not None:
            parse_start_rate(value)
        return value

    @field_validator("max_failures")
    @classmethod
    def check_max_failures(cls, value: Union[int, str, None]) -> Union[int, str, None]:
        if value is not None:
            parse_max_failures(value)
        return value

    @field_validator("phases")
    @classmethod
    def check_rest_is_last(cls, phases: List[PhaseSpec]) -> List[PhaseSpec]:
        for index, phase in enumerate(phases[:-1]):
            if phase.rest:
                raise ValueError(
                    f"phase {index + 1} takes the rest of the targets, so the phases after it would be empty; "
                    "make it the last phase"
                )
        return phases

    def start_rate_per_second(self) -> Optional[float]:
        return None if self.max_start_rate is None else parse_start_rate(self.max_start_rate)

    def failure_limits(self) -> tuple[Optional[int], Optional[float]]:
        """Return (count, percent): the threshold as a count of devices, or as a percentage, the other None."""

        return (None, None) if self.max_failures is None else parse_max_failures(self.max_failures)


def parse_start_rate(value: Union[float, str]) -> float:
    """Return devices per second from a number (per second) or a text `N/s` or `N/min`."""

    if isinstance(value, (int, float)):
        rate = float(value)
    else:
        match = START_RATE_PATTERN.match(value)
        if match is None:
            raise ValueError(
                f"max_start_rate {value!r} is not a rate; write devices per second or per minute, "
                "for example `5/s` or `30/min`"
            )
        rate = float(match.group(1)) / (1 if match.group(2).startswith("s") else 60)
    if rate <= 0:
        raise ValueError(f"max_start_rate {value!r} must be above zero; leave it out for no limit")
    return rate


def parse_max_failures(value: Union[int, str]) -> tuple[Optional[int], Optional[float]]:
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"max_failures {value} must be 0 or more")
        return value, None
    match = FAILURES_PERCENT_PATTERN.match(value)
    if match is not None and float(match.group(1)) <= 100:
        return None, float(match.group(1))
    if value.strip().isdigit():
        return int(value), None
    raise ValueError(
        f"max_failures {value!r} is neither a device count (`3`) nor a percentage from 0 to 100 (`20%`)"
    )


def assign_phases(
    deployment_id: str,
    device_ids: Iterable[str],
    phases: list[PhaseSpec],
    groups_of: dict[str, set[str]],
    tags_of: dict[str, set[str]],
) -> dict[str, int]:
    """Map each frozen device to the index of the first phase that selects it; unselected devices are left out.

    A percent phase takes the share of all targets, rounded up, among devices
    not yet taken, in an order fixed by a hash of deployment and device id,
    so consecutive device names spread across phases and a retry gives the
    same split.
    """

    all_ids = sorted(device_ids)
    if not phases:
        return {device_id: 0 for device_id in all_ids}
    remaining = sorted(all_ids, key=lambda device_id: spread_key(deployment_id, device_id))
    assigned: dict[str, int] = {}
    for index, phase in enumerate(phases):
        if phase.rest:
            chosen = remaining
        elif phase.percent is not None:
            chosen = remaining[: math.ceil(len(all_ids) * phase.percent / 100)]
        else:
            devices, groups, tags = set(phase.devices), set(phase.groups), set(phase.tags)
            chosen = [
                device_id for device_id in remaining
                if device_id in devices
                or groups_of.get(device_id, set()) & groups
                or tags_of.get(device_id, set()) & tags
            ]
        taken = set(chosen)
        assigned.update((device_id, index) for device_id in chosen)
        remaining = [device_id for device_id in remaining if device_id not in taken]
    return assigned


def spread_key(deployment_id: str, device_id: str) -> str:
    return hashlib.sha256(f"{deployment_id}/{device_id}".encode()).hexdigest()
