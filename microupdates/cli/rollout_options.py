"""Command-line options for a deployment's limits, failure threshold and phases, shared by deploy and redeploy."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from microupdates.rollout import DEFAULT_MAX_CONCURRENT, MAX_CONCURRENT_LIMIT

# Keys of a --phase value and the field each one sets; repeatable keys build lists.
PHASE_LIST_KEYS = {"group": "groups", "tag": "tags", "device": "devices"}
PHASE_NUMBER_KEYS = {"percent": "percent", "min-success-rate": "min_success_rate"}
PHASE_INTEGER_KEYS = {"soak": "soak_seconds"}

MaxConcurrentOption = Annotated[
    int,
    typer.Option("--max-concurrent", min=1, max=MAX_CONCURRENT_LIMIT, help="Devices updating at once."),
]
MaxStartRateOption = Annotated[
    Optional[str],
    typer.Option(
        "--max-start-rate",
        help="Devices started per second or minute at most, such as 5/s or 30/min. Default: no limit.",
        show_default=False,
    ),
]
MaxFailuresOption = Annotated[
    Optional[str],
    typer.Option(
        "--max-failures",
        help="Stop the rollout, aborting the devices left, when more devices fail than this count (3) "
        "or share of the finished devices (20%). Default: never stop.",
        show_default=False,
    ),
]
MinFinishedOption = Annotated[
    int,
    typer.Option("--min-finished", min=1, help="Finished devices needed before --max-failures is evaluated."),
]
PhaseOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--phase",
        help="One phase of the rollout, in order; repeat for several. Comma-separated keys: group=G, tag=T, "
        "device=D (repeatable), percent=P, rest, name=N, min-success-rate=P (default 100), soak=SECONDS. "
        "Example: --phase group=test,soak=600 --phase percent=10,min-success-rate=90 --phase rest",
        show_default=False,
    ),
]


def build_rollout(
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_start_rate: str | None = None,
    max_failures: str | None = None,
    min_finished: int = 1,
    phases: list[str] | None = None,
) -> dict[str, Any]:
    """Return the rollout fields of a deployment request; the API validates their values."""

    rollout: dict[str, Any] = {"max_concurrent": max_concurrent, "min_finished": min_finished}
    if max_start_rate is not None:
        rollout["max_start_rate"] = max_start_rate
    if max_failures is not None:
        rollout["max_failures"] = max_failures
    if phases:
        rollout["phases"] = [parse_phase(text) for text in phases]
    return rollout


def parse_phase(text: str) -> dict[str, Any]:
    """Turn `group=test,soak=600` into a phase of the API; raise typer.BadParameter on an unknown key or value."""

    phase: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, separator, value = item.partition("=")
        key = key.strip()
        value = value.strip()
        if key == "rest" and not separator:
            phase["rest"] = True
        elif key == "name" and separator:
            phase["name"] = value
        elif key in PHASE_LIST_KEYS and separator:
            phase.setdefault(PHASE_LIST_KEYS[key], []).append(value)
        elif key in PHASE_NUMBER_KEYS and separator:
            phase[PHASE_NUMBER_KEYS[key]] = parse_number(text, key, value, float)
        elif key in PHASE_INTEGER_KEYS and separator:
            phase[PHASE_INTEGER_KEYS[key]] = parse_number(text, key, value, int)
        else:
            raise typer.BadParameter(
                f"{item!r} in --phase {text!r} is not a phase setting; use group=G, tag=T, device=D, percent=P, "
                "rest, name=N, min-success-rate=P or soak=SECONDS.",
                param_hint="--phase",
            )
    return phase


def parse_number(text: str, key: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise typer.BadParameter(
            f"{key}={value!r} in --phase {text!r} is not a {'whole ' if kind is int else ''}number.",
            param_hint="--phase",
        ) from None
