"""`microupdates deploy`: deploy a recipe file or a stored update, and optionally wait for the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.connection import operator_api
from microupdates.cli.follow import follow_deployment
from microupdates.cli.options import (
    DEFAULT_WATCH_TIMEOUT_SECONDS,
    PlainOption,
    ServerOption,
    WatchJsonOption,
    WatchTimeoutOption,
)
from microupdates.cli.output import echo_json, fail, make_console
from microupdates.cli.rollout_options import (
    MaxConcurrentOption,
    MaxFailuresOption,
    MaxStartRateOption,
    MinFinishedOption,
    PhaseOption,
    build_rollout,
)
from microupdates.protocol.recipe import (
    MAX_CHECK_IN_DEADLINE_SECONDS,
    MAX_HEARTBEAT_TIMEOUT_SECONDS,
    MAX_RETRY_INITIAL_INTERVAL_SECONDS,
    MAX_STAGE_MAX_ATTEMPTS,
)
from microupdates.rollout import DEFAULT_MAX_CONCURRENT


def deploy(
    recipe: Annotated[
        Optional[Path],
        typer.Argument(help="Recipe file to store as a new update and deploy. Give this or --update.", show_default=False),
    ] = None,
    update: Annotated[
        Optional[str], typer.Option("--update", help="Id of a stored update to deploy, instead of a recipe file.")
    ] = None,
    device: Annotated[
        Optional[list[str]], typer.Option("--device", help="Target device; repeat for several.")
    ] = None,
    group: Annotated[Optional[list[str]], typer.Option("--group", help="Target group; repeat for several.")] = None,
    tag: Annotated[
        Optional[list[str]], typer.Option("--tag", help="Target every device with this tag; repeat for several.")
    ] = None,
    check_in_deadline: Annotated[
        Optional[int],
        typer.Option(
            "--check-in-deadline",
            min=1,
            max=MAX_CHECK_IN_DEADLINE_SECONDS,
            help="Seconds each device has to check in before it is marked timed_out. Default: the recipe's.",
        ),
    ] = None,
    heartbeat_timeout: Annotated[
        Optional[int],
        typer.Option(
            "--heartbeat-timeout",
            min=10,
            max=MAX_HEARTBEAT_TIMEOUT_SECONDS,
            help="Seconds without a progress report before a running stage fails. Default: the recipe's.",
        ),
    ] = None,
    max_concurrent: MaxConcurrentOption = DEFAULT_MAX_CONCURRENT,
    max_start_rate: MaxStartRateOption = None,
    max_failures: MaxFailuresOption = None,
    min_finished: MinFinishedOption = 1,
    phase: PhaseOption = None,
    deadline: Annotated[
        Optional[str],
        typer.Option(
            "--deadline",
            help="Devices that have not checked in by then end timed_out: a duration from now (90s, 30m, 2h, 1d) "
            "or a date-time with a time zone (2026-05-01T18:00:00Z). Applies on top of --check-in-deadline.",
        ),
    ] = None,
    max_attempts: Annotated[
        Optional[int],
        typer.Option(
            "--max-attempts",
            min=1,
            max=MAX_STAGE_MAX_ATTEMPTS,
            help="Runs of a stage that fails transiently (download error, agent restart), the first included; "
            "1 turns retries off. Default: the recipe's (3).",
        ),
    ] = None,
    retry_interval: Annotated[
        Optional[int],
        typer.Option(
            "--retry-interval",
            min=1,
            max=MAX_RETRY_INITIAL_INTERVAL_SECONDS,
            help="Seconds before a stage's second run, doubled before each further one. Default: the recipe's (5).",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the deployment until it ends, showing each device's progress.")] = False,
    timeout: WatchTimeoutOption = DEFAULT_WATCH_TIMEOUT_SECONDS,
    plain: PlainOption = False,
    as_json: WatchJsonOption = False,
    server: ServerOption = None,
) -> None:
    """Deploy an update to devices, groups and tags; without --device, --group or --tag, to the recipe's targets.

    --max-concurrent, --max-start-rate and --max-failures limit the rollout;
    --phase splits it into phases gated on the success rate of the one before.

    With --wait the exit code is 0 when every device succeeded, 2 when the
    deployment ended failed or aborted, and 1 on errors or when --timeout
    passes first.
    """

    if (recipe is None) == (update is None):
        fail("Give either a RECIPE file or --update ID, not both and not neither.")
    if recipe is not None and not recipe.exists():
        fail(f"Recipe file {recipe} not found; to deploy a stored update, use --update ID.")
    rollout = build_rollout(max_concurrent, max_start_rate, max_failures, min_finished, phase)

    with operator_api(server) as api:
        if recipe is not None:
            created = api.create_update_from_file(recipe)
            update = created["id"]
            report_step(as_json, "update_created", f"Created update {update} (version {created['version']}) from {recipe}",
                        update_id=update, version=created["version"], recipe=str(recipe))

        timeouts = None
        if check_in_deadline is not None or heartbeat_timeout is not None:
            timeouts = with_recipe_settings(api, update, "timeouts", {
                "check_in_deadline_seconds": check_in_deadline, "heartbeat_timeout_seconds": heartbeat_timeout,
            })

        retries = None
        if max_attempts is not None or retry_interval is not None:
            retries = with_recipe_settings(api, update, "retries", {
                "max_attempts": max_attempts, "initial_interval_seconds": retry_interval,
            })

        deployment = api.deploy(
            update, devices=device, groups=group, tags=tag, timeouts=timeouts, rollout=rollout,
            retries=retries, check_in_deadline=deadline,
        )
        report_step(
            as_json,
            "deployment_created",
            f"Deployment {deployment['id']} of update {update} started (workflow {deployment['workflow_id']})",
            deployment_id=deployment["id"],
            update_id=update,
            workflow_id=deployment["workflow_id"],
        )

        if not wait:
            if not as_json:
                make_console().print(f"Follow it with: microupdates deployments watch {deployment['id']}", style="dim")
            return
        follow_deployment(api, deployment["id"], plain, as_json, timeout, baseline_first_poll=False)


def report_step(as_json: bool, event: str, message: str, **fields: Any) -> None:
    if as_json:
        echo_json({"event": event, **fields})
    else:
        make_console().print(message, soft_wrap=True)


def with_recipe_settings(
    api: OperatorApiClient, update_id: str, section: str, overrides: dict[str, int | None]
) -> dict[str, int]:
    """Return the recipe's settings in `section` (timeouts, retries) with the command line's values on top.

    The API replaces a recipe's section as a whole when a deployment sets
    it, so a field left out would fall back to the built-in default rather
    than to the recipe's value.
    """

    recipe_settings = api.read_update(update_id)["recipe"].get(section) or {}
    settings = {key: value for key, value in recipe_settings.items() if isinstance(value, int)}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings
