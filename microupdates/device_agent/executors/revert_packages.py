"""The revert_packages compensation: bring every recorded package back to its version before the update.

Managers are undone in the reverse of the install order (npm, pip3, pip,
apt), and records of repeated dependencies stages newest first. For each
package the current version is read again (see package_versions) and
compared with the recorded one:

- not installed before: it is removed (`apt-get remove`,
  `pip uninstall -y`, `npm uninstall`);
- another version before: that exact version is installed
  (`apt-get install --allow-downgrades NAME=VERSION`, `pip install
  NAME==VERSION`, `npm install NAME@VERSION`);
- the same version: nothing happens.

After each action the version is read once more, so an action that exits
with status 0 without restoring the version still fails. A virtualenv or npm
directory that the update created is deleted instead, with everything
installed in it. NOTE: packages that the named ones pulled in as their
dependencies are neither recorded nor removed, and an npm project's
package.json and package-lock.json keep the specs that the restoring
`npm install` writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Dict, List, Optional

from microupdates.device_agent.change_log import ChangeLog, ManagerRecord, PackageVersion
from microupdates.device_agent.executors.commands import OutputCallback, run_process
from microupdates.device_agent.executors.package_versions import (
    VersionQuery,
    describe_version,
    query_manager_versions,
)
from microupdates.device_agent.executors.packages import (
    APT_ENVIRONMENT,
    APT_LOCK_TIMEOUT_SECONDS,
    NPM_INSTALL_OPTIONS,
    PIP_INSTALL_OPTIONS,
    apt_install_options,
)
from microupdates.device_agent.filesystem import fsync_directory
from microupdates.protocol.device_api import REVERT_PACKAGES_STAGE, StepResult

logger = logging.getLogger(__name__)

REVERT_ORDER = ("npm", "pip3", "pip", "apt")
REVERT_PACKAGES_STEP = "revert packages"
# Output that shows that a manager could not find the requested version.
VERSION_UNAVAILABLE_MARKERS = {
    "apt": (("was not found",), "that version is no longer available from the configured apt sources"),
    "pip": (("No matching distribution found",), "that version is not available from the package index"),
    "pip3": (("No matching distribution found",), "that version is not available from the package index"),
    "npm": (("ETARGET", "No matching version found"), "that version is not available from the npm registry"),
}


def _apt_environment(env: Dict[str, str]) -> Dict[str, str]:
    """Return env with apt's non-interactive settings and without LANGUAGE, so apt's messages stay in English."""

    apt_env = {key: value for key, value in env.items() if key != "LANGUAGE"}
    apt_env.update(APT_ENVIRONMENT)
    return apt_env


class _ActionRunner:
    """Runs revert commands for one manager, each bounded by the manager's timeout from the recipe."""

    def __init__(
        self,
        record: ManagerRecord,
        env: Dict[str, str],
        cwd: str,
        abort_event: Optional[threading.Event],
        on_output: Optional[OutputCallback],
    ) -> None:
        self.record = record
        self.env = _apt_environment(env) if record.manager == "apt" else env
        self.cwd = cwd
        self.abort_event = abort_event
        self.on_output = on_output
        self.query = VersionQuery(self.env, cwd, abort_event)

    def run(self, argv: List[str], name: str) -> StepResult:
        if self.abort_event is not None and self.abort_event.is_set():
            return StepResult(name=name, error="aborted")
        return run_process(
            argv,
            name=name,
            timeout_seconds=self.record.timeout_seconds,
            env=self.env,
            cwd=self.cwd,
            abort_event=self.abort_event,
            on_output=self.on_output,
        )

    def program(self) -> Optional[str]:
        """Return the executable that changes this manager's packages, or None when it is missing."""

        if self.record.manager == "apt":
            return self.query.which("apt-get")
        if self.record.manager == "npm":
            return self.query.which("npm")
        interpreter = self.record.interpreter
        return interpreter if interpreter is not None and os.path.exists(interpreter) else None

    def remove_argv(self, program: str, name: str) -> List[str]:
        if self.record.manager == "apt":
            return [program, "remove", *apt_install_options(APT_LOCK_TIMEOUT_SECONDS), "--", name]
        if self.record.manager == "npm":
            return [program, "uninstall", *NPM_INSTALL_OPTIONS, *self._npm_location(), "--", name]
        return [program, "-m", "pip", "uninstall", "-y", *PIP_INSTALL_OPTIONS, "--", name]

    def install_argv(self, program: str, name: str, version: str) -> List[str]:
        if self.record.manager == "apt":
            options = apt_install_options(APT_LOCK_TIMEOUT_SECONDS)
            return [program, "install", *options, "--allow-downgrades", "--", f"{name}={version}"]
        if self.record.manager == "npm":
            return [program, "install", *NPM_INSTALL_OPTIONS, *self._npm_location(), "--", f"{name}@{version}"]
        return [program, "-m", "pip", "install", *PIP_INSTALL_OPTIONS, "--", f"{name}=={version}"]

    def _npm_location(self) -> List[str]:
        if self.record.npm_directory is None:
            return ["-g"]
        return ["--prefix", self.record.npm_directory]


def _remove_created_directory(record: ManagerRecord) -> Optional[StepResult]:
    """Delete the virtualenv or npm directory the update created, then its created parents when empty."""

    target = record.virtualenv or record.npm_directory
    assert target is not None and record.created_directory is not None
    description = "virtualenv" if record.virtualenv is not None else "npm directory"
    name = f"{record.manager}: remove {description} {target}"
    if not os.path.lexists(target):
        return None

    started = time.monotonic()
    try:
        shutil.rmtree(target)
        current = os.path.dirname(target)
        while len(current) >= len(record.created_directory) and not os.listdir(current):
            os.rmdir(current)
            current = os.path.dirname(current)
        fsync_directory(current)
    except OSError as error:
        return StepResult(name=name, duration_seconds=time.monotonic() - started, error=str(error))

    logger.info("Removed %s %s, which the update created", description, target)
    return StepResult(
        name=name,
        duration_seconds=time.monotonic() - started,
        output=f"removed {target}, which the update created, with everything installed in it\n",
    )


def _explain_failure(manager: str, result: StepResult) -> str:
    assert result.error is not None
    markers, explanation = VERSION_UNAVAILABLE_MARKERS[manager]
    if result.error != "aborted" and any(marker in result.output for marker in markers):
        return f"{explanation} ({result.error})"
    return result.error


def _restore_package(runner: _ActionRunner, previous: PackageVersion, current: PackageVersion) -> StepResult:
    """Remove the package or install its previous version, then check the version it ends at."""

    manager = runner.record.manager
    program = runner.program()
    if previous.version is None:
        name = f"{manager}: remove {previous.name}"
        failure = f"could not remove {manager} package {previous.name}, which the update installed"
    else:
        name = f"{manager}: restore {previous.name} {previous.version}"
        failure = f"could not restore {manager} package {previous.name} to version {previous.version}"

    if program is None:
        missing = runner.record.interpreter if manager in ("pip", "pip3") else manager
        return StepResult(name=name, error=f"{failure}: {missing} is not available any more")

    if previous.version is None:
        result = runner.run(runner.remove_argv(program, previous.name), name)
    else:
        result = runner.run(runner.install_argv(program, previous.name, previous.version), name)
    if result.error is not None:
        result.error = f"{failure}: {_explain_failure(manager, result)}"
        return result

    after = query_manager_versions(runner.record, [previous.name], runner.query)[previous.name]
    if after.error is not None or after.version != previous.version:
        result.error = (
            f"{failure}: the command succeeded, but {previous.name} is now {describe_version(after)} "
            f"(was {describe_version(current)} before the revert)"
        )
    return result


def _revert_manager(
    record: ManagerRecord, runner: _ActionRunner, unchanged: List[str]
) -> List[StepResult]:
    if record.created_directory is not None:
        removal = _remove_created_directory(record)
        return [removal] if removal is not None else []

    names = [package.name for package in record.packages if package.error is None]
    current_versions = query_manager_versions(record, names, runner.query)
    steps = []
    for previous in reversed(record.packages):
        if previous.error is not None:
            steps.append(
                StepResult(
                    name=f"{record.manager}: restore {previous.name}",
                    error=(
                        f"cannot revert {record.manager} package {previous.name}, because its version before "
                        f"the update was not recorded: {previous.error}"
                    ),
                )
            )
            continue

        current = current_versions[previous.name]
        if current.error is not None:
            steps.append(
                StepResult(
                    name=f"{record.manager}: restore {previous.name}",
                    error=f"could not find the installed version of {previous.name}: {current.error}",
                )
            )
            continue
        if current.version == previous.version:
            unchanged.append(f"{record.manager} {previous.name}: {describe_version(previous)}, unchanged")
            continue
        steps.append(_restore_package(runner, previous, current))
    return steps


def revert_packages(
    change_log: ChangeLog,
    *,
    env: Dict[str, str],
    cwd: str,
    abort_event: Optional[threading.Event] = None,
    on_output: Optional[OutputCallback] = None,
) -> List[StepResult]:
    """Undo the package changes of every dependencies stage not reverted yet; return one StepResult per action.

    A failed action does not stop the others. When any failed, the log stays
    unmarked and a later run retries, skipping the packages already back.
    When no package needed an action, one step reports that there was nothing to revert.
    """

    started = time.monotonic()
    completed = change_log.completed_through(REVERT_PACKAGES_STAGE) or 0
    records = [(sequence, record) for sequence, record in change_log.read_packages() if sequence > completed]

    steps: List[StepResult] = []
    unchanged: List[str] = []
    for _, record in reversed(records):
        by_manager = {manager.manager: manager for manager in record.managers}
        for manager in REVERT_ORDER:
            if manager in by_manager:
                runner = _ActionRunner(by_manager[manager], env, cwd, abort_event, on_output)
                steps.extend(_revert_manager(by_manager[manager], runner, unchanged))

    if any(step.error is not None for step in steps):
        return steps
    if records:
        change_log.mark_completed(REVERT_PACKAGES_STAGE, records[-1][0])
    if steps:
        return steps

    summary = "nothing to revert\n" + "".join(f"{line}\n" for line in unchanged)
    return [StepResult(name=REVERT_PACKAGES_STEP, duration_seconds=time.monotonic() - started, output=summary)]
