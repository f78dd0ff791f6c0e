"""`microupdates deployments`: list, show, watch, abort, redeploy, pause, resume and promote deployments."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from microupdates.cli.connection import operator_api
from microupdates.cli.follow import follow_deployment
from microupdates.cli.options import (
    DEFAULT_WATCH_TIMEOUT_SECONDS,
    JsonOption,
    PlainOption,
    ServerOption,
    WatchJsonOption,
    WatchTimeoutOption,
)
from microupdates.cli.rollout_options import (
    MaxConcurrentOption,
    MaxFailuresOption,
    MaxStartRateOption,
    MinFinishedOption,
    PhaseOption,
    build_rollout,
)
from microupdates.cli.output import (
    describe_device_error,
    echo_json_document,
    escape_device_text,
    fail,
    format_seconds,
    make_console,
    styled_status,
)
from microupdates.cli.tables import (
    deployment_details_table,
    deployment_devices_table,
    deployment_phases_table,
    deployments_table,
    stage_results_table,
)
from microupdates.rollout import DEFAULT_MAX_CONCURRENT
from microupdates.workflows.contracts import DEVICE_SKIPPED

app = typer.Typer(
    help="List, show, watch, abort, redeploy, pause, resume and promote deployments. "
    "Without a command, lists recent deployments.",
    invoke_without_command=True,
)


@app.callback()
def list_when_no_command(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        list_deployments(server=None, limit=20, as_json=False)


@app.command("list")
def list_deployments(
    server: ServerOption = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Number of deployments to show, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """List recent deployments, newest first, with the number of devices in each status."""

    with operator_api(server) as api:
        rows = api.list_deployments(limit)

    if as_json:
        echo_json_document(rows)
        return
    console = make_console()
    if not rows:
        console.print("No deployments yet.")
        return
    console.print(deployments_table(rows))


@app.command("show")
def show_deployment(deployment: str, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show one deployment and the status of each of its devices."""

    with operator_api(server) as api:
        detail = api.read_deployment_with_all_devices(deployment)

    if as_json:
        echo_json_document(detail)
        return
    console = make_console()
    console.print(deployment_details_table(detail))
    if len(detail.get("phases") or []) > 1 or detail.get("rollout", {}).get("phases"):
        console.print(deployment_phases_table(detail))
    if detail["devices"]:
        console.print(deployment_devices_table(detail))


@app.command("device")
def show_device_result(
    deployment: str,
    device: str,
    server: ServerOption = None,
    output: Annotated[bool, typer.Option("--output/--no-output", help="Print each step's captured output.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Show one device's result in a deployment: each stage's status, exit code, duration, error and output."""

    with operator_api(server) as api:
        result = api.read_device_result(deployment, device)

    if as_json:
        echo_json_document(result)
        return
    console = make_console()
    summary = Text.assemble(f"Device {result['device_id']} in deployment {deployment}: ", styled_status(result["status"]))
    if result["stage"]:
        summary.append(f" (stage {result['stage']})")
    console.print(summary)
    error = describe_device_error(result)
    if error:
        console.print(Text(error, style="red"))
    if not result["stages"] and result["status"] == DEVICE_SKIPPED:
        console.print("No stage ran on this device, because it was skipped.")
        return
    if not result["stages"]:
        console.print("No stage has run on this device yet.")
        return
    console.print(stage_results_table(result))
    if output:
        print_step_outputs(console, result)


def print_step_outputs(console: Console, result: dict[str, Any]) -> None:
    for stage in result["stages"]:
        for step in stage["steps"]:
            name = step.get("name") or "step"
            title = stage["stage"] if name == stage["stage"] else f"{stage['stage']}, step {name}"
            details = []
            if step.get("exit_code") is not None:
                details.append(f"exit code {step['exit_code']}")
            details.append(f"{format_seconds(step.get('duration_seconds'))} s")
            if step.get("output_truncated"):
                details.append("output truncated")
            console.print(Text(f"--- {title}: {', '.join(details)}", style="bold"), soft_wrap=True)
            if step.get("error"):
                console.print(Text(escape_device_text(step["error"]), style="red"), soft_wrap=True)
            text = escape_device_text(step.get("output") or "")
            if text:
                typer.echo(text, nl=not text.endswith("\n"))


@app.command("abort")
def abort_deployment(
    deployment: str,
    device: Annotated[
        Optional[str], typer.Option("--device", help="Abort only this device's update; the others go on.")
    ] = None,
    server: ServerOption = None,
) -> None:
    """Abort a deployment or one of its devices; started devices roll back first.

    Devices that have not started end `aborted` at once. A running device
    stops its stage at its next progress report and rolls back. Devices that
    already finished keep their result.
    """

    with operator_api(server) as api:
        result = api.abort(deployment, device)

    target = f"device {device} in deployment {deployment}" if device else f"deployment {deployment}"
    console = make_console()
    if not result["accepted"]:
        console.print(f"Nothing to abort: {target} had already ended or been aborted.")
        return
    console.print(
        f"Abort requested for {target}; {result['jobs_ended']} queued jobs ended. "
        f"Follow it with: microupdates deployments watch {deployment}",
        soft_wrap=True,
    )


@app.command("watch")
def watch_deployment(
    deployment: str,
    timeout: WatchTimeoutOption = DEFAULT_WATCH_TIMEOUT_SECONDS,
    plain: PlainOption = False,
    as_json: WatchJsonOption = False,
    server: ServerOption = None,
) -> None:
    """Follow a deployment until it ends, showing each device's progress.

    Exit code 0 when every device succeeded, 2 when the deployment ended
    failed or aborted, 1 on errors or when --timeout passes first.
    """

    with operator_api(server) as api:
        follow_deployment(api, deployment, plain, as_json, timeout, baseline_first_poll=True)


@app.command("redeploy")
def redeploy_deployment(
    deployment: str,
    device: Annotated[Optional[list[str]], typer.Option("--device", help="Target device; repeat for several.")] = None,
    group: Annotated[Optional[list[str]], typer.Option("--group", help="Target group; repeat for several.")] = None,
    tag: Annotated[
        Optional[list[str]], typer.Option("--tag", help="Target every device with this tag; repeat for several.")
    ] = None,
    max_concurrent: MaxConcurrentOption = DEFAULT_MAX_CONCURRENT,
    max_start_rate: MaxStartRateOption = None,
    max_failures: MaxFailuresOption = None,
    min_finished: MinFinishedOption = 1,
    phase: PhaseOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the new deployment until it ends.")] = False,
    timeout: WatchTimeoutOption = DEFAULT_WATCH_TIMEOUT_SECONDS,
    plain: PlainOption = False,
    as_json: WatchJsonOption = False,
    server: ServerOption = None,
) -> None:
    """Deploy a deployment's update, unchanged, to other devices, groups or tags.

    The new deployment records the one it came from, and keeps its timeouts.
    Limits and phases are not copied: give them again when needed.
    """

    if not (device or group or tag):
        fail("Name the targets of the new deployment with --device, --group or --tag.")
    rollout = build_rollout(max_concurrent, max_start_rate, max_failures, min_finished, phase)
    with operator_api(server) as api:
        created = api.redeploy(deployment, devices=device, groups=group, tags=tag, rollout=rollout)
        if as_json:
            echo_json_document({"event": "deployment_created", "deployment_id": created["id"],
                                "source_deployment_id": deployment, "workflow_id": created["workflow_id"]})
        else:
            make_console().print(
                f"Deployment {created['id']} redeploys the update of {deployment} (workflow {created['workflow_id']})",
                soft_wrap=True,
            )
        if wait:
            follow_deployment(api, created["id"], plain, as_json, timeout, baseline_first_poll=False)


PhaseNumberOption = Annotated[
    Optional[int],
    typer.Option("--phase", min=1, help="Act only if this 1-based phase is still the current one.", show_default=False),
]


@app.command("pause")
def pause_deployment(deployment: str, phase: PhaseNumberOption = None, server: ServerOption = None) -> None:
    """Start no further device until resumed; devices already updating go on."""

    control_rollout(deployment, "pause", phase, server)


@app.command("resume")
def resume_deployment(deployment: str, phase: PhaseNumberOption = None, server: ServerOption = None) -> None:
    """Let a paused deployment start devices again."""

    control_rollout(deployment, "resume", phase, server)


@app.command("promote")
def promote_deployment(deployment: str, phase: PhaseNumberOption = None, server: ServerOption = None) -> None:
    """Skip the success-rate gate and soak time of the current phase, so the next phase starts."""

    control_rollout(deployment, "promote", phase, server)


def control_rollout(deployment: str, action: str, phase: int | None, server: str | None) -> None:
    with operator_api(server) as api:
        result = api.control_rollout(deployment, action, phase)
    console = make_console()
    console.print(result["message"], soft_wrap=True)
    console.print(
        Text.assemble(
            f"Deployment {deployment}: phase {result['phase']} ", styled_status(result["phase_state"]),
            ", paused" if result["paused"] else "",
        )
    )
