"""Follow a deployment to its end for `deploy --wait` and `deployments watch`, and end the command with its exit code."""

from __future__ import annotations

from typing import NoReturn

import typer

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.output import print_error, print_warning
from microupdates.cli.watch import watch_deployment
from microupdates.cli.watch_display import choose_reporter

# The shell's exit code for a command stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def follow_deployment(
    api: OperatorApiClient,
    deployment_id: str,
    plain: bool,
    as_json: bool,
    timeout_seconds: float,
    baseline_first_poll: bool,
) -> NoReturn:
    """Watch until the deployment ends, then exit: 0 if every device succeeded, 2 if it ended otherwise, 1 on timeout.

    Ctrl-C stops the watch only; the deployment keeps running on the server.
    """

    reporter = choose_reporter(plain, as_json)
    try:
        result = watch_deployment(api, deployment_id, reporter, timeout_seconds, baseline_first_poll)
    except KeyboardInterrupt:
        print_warning(
            f"Stopped watching; deployment {deployment_id} keeps running. "
            f"Watch it again with `microupdates deployments watch {deployment_id}`."
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None

    if result.timed_out:
        print_error(
            f"Deployment {deployment_id} did not finish within {timeout_seconds:g} s and keeps running; "
            f"watch it again with `microupdates deployments watch {deployment_id}`."
        )
    raise typer.Exit(result.exit_code)
