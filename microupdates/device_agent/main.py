"""Command line of the device agent: `microupdates-agent --config FILE` or flags."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from microupdates import __version__
from microupdates.device_agent.agent import Agent
from microupdates.device_agent.config import AgentConfigError, load_config


def parse_arguments(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="microupdates-agent",
        description="Run the microupdates device agent: check in with the server and apply updates.",
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON file with the settings below")
    parser.add_argument("--server-url", help="base URL of the microupdates API, e.g. http://server:8080")
    parser.add_argument("--device-token", help="this device's token (or use --enrolment-key)")
    parser.add_argument("--enrolment-key", help="fleet enrolment key used once to obtain a device token")
    parser.add_argument("--device-name", help="name to enrol under")
    parser.add_argument("--tag", dest="tags", action="append", help="tag to enrol with; repeat for several")
    parser.add_argument("--state-dir", type=Path, help="directory for the journal, credentials and downloads")
    parser.add_argument("--device-root", type=Path,
                        help="simulate a device under this directory (destinations are mapped under it)")
    parser.add_argument("--ca-file", type=Path, help="CA bundle (PEM) that verifies the server's TLS certificate")
    parser.add_argument("--server-public-key",
                        help="the server's job-signing key (base64); unset, the key presented at enrolment is pinned")
    parser.add_argument("--long-poll-seconds", type=int, help="how long each check-in waits for a job")
    parser.add_argument("--restart-instead-of-reboot", action="store_true", default=None,
                        help="for simulated devices: a rollback reboot restarts the agent process instead")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser.parse_args(argv)


def main(argv: list = None) -> None:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    overrides = {
        "server_url": arguments.server_url,
        "device_token": arguments.device_token,
        "enrolment_key": arguments.enrolment_key,
        "device_name": arguments.device_name,
        "tags": arguments.tags,
        "state_dir": arguments.state_dir,
        "device_root": arguments.device_root,
        "long_poll_seconds": arguments.long_poll_seconds,
        "ca_file": arguments.ca_file,
        "server_public_key": arguments.server_public_key,
        "restart_instead_of_reboot": arguments.restart_instead_of_reboot,
    }
    if arguments.state_dir is None and arguments.device_root is not None:
        overrides["state_dir"] = arguments.device_root / "var/lib/microupdates-agent"
    try:
        config = load_config(arguments.config, overrides)
    except AgentConfigError as error:
        sys.exit("microupdates-agent: %s" % error)

    stop_event = threading.Event()

    def request_stop(signum, _frame) -> None:
        logging.getLogger(__name__).info("Signal %d received; stopping", signum)
        stop_event.set()
        # Interrupts a blocking long poll; a stage cut short here is reported
        # as interrupted after the next start, from the journal.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        agent = Agent(config, stop_event)
    except AgentConfigError as error:
        sys.exit("microupdates-agent: %s" % error)
    agent.run()


if __name__ == "__main__":
    main()
