"""The dependencies stage: apt, pip, pip3 and npm packages, installed without prompts.

Each manager's packages go to one install command, run through run_process,
so they get stdin from /dev/null, their own process group and a timeout. A
manager's timeout_seconds bounds all of its commands together, including
checks and creating a virtualenv or directory first. Package names and
versions are argv entries after `--`, never shell text. Known failures (a held dpkg lock,
unfinished packages, a package missing from apt's lists, a PEP 668
rejection) get errors from package_checks that name the cause and the fix.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Dict, List, Optional

from microupdates.device_agent.device_paths import map_device_path
from microupdates.device_agent.executors.commands import OutputCallback, run_process
from microupdates.device_agent.executors.package_checks import (
    describe_apt_lock_failure,
    describe_apt_lock_timeout,
    describe_dpkg_interrupted,
    describe_externally_managed,
    describe_interpreter,
    describe_missing_apt_packages,
    describe_unfinished_packages,
    find_lock_holder,
    is_apt_lock_failure,
    is_externally_managed_error,
    unfinished_packages,
)
from microupdates.protocol.device_api import StepResult
from microupdates.protocol.recipe import (
    DEFAULT_APT_LOCK_TIMEOUT_SECONDS,
    AptPackages,
    Dependencies,
    NpmPackages,
    PackageGroup,
    PipPackages,
)

logger = logging.getLogger(__name__)

# Default time apt-get waits for a dpkg lock held by another process before
# it fails (apt's DPkg::Lock::Timeout option, in whole seconds).
APT_LOCK_TIMEOUT_SECONDS = DEFAULT_APT_LOCK_TIMEOUT_SECONDS
# -y answers apt's own questions. The dpkg options keep changed configuration
# files without asking: dpkg's default action where it has one, else the
# installed version.
APT_NONINTERACTIVE_OPTIONS = [
    "-y",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
]
# LC_ALL=C.UTF-8 keeps apt and dpkg messages untranslated, because
# package_checks matches them, and keeps UTF-8 for maintainer scripts.
# LANGUAGE is removed from apt's environment for the same reason.
APT_ENVIRONMENT = {
    "DEBIAN_FRONTEND": "noninteractive",
    "NEEDRESTART_MODE": "a",
    "APT_LISTCHANGES_FRONTEND": "none",
    "LC_ALL": "C.UTF-8",
}
PIP_INSTALL_OPTIONS = ["--disable-pip-version-check", "--no-input"]
NPM_INSTALL_OPTIONS = ["--no-audit", "--no-fund", "--no-progress"]

# The interpreter whose pip each manager uses when no virtualenv is given.
PIP_INTERPRETERS = {"pip": "python", "pip3": "python3"}
# Virtualenvs are always created with python3, because `python` may be
# Python 2, which has no venv module.
VIRTUALENV_CREATOR = "python3"


class _GroupRunner:
    """Runner for one manager's commands, which share the manager's timeout."""

    def __init__(
        self,
        timeout_seconds: float,
        env: Dict[str, str],
        cwd: str,
        abort_event: Optional[threading.Event],
        on_output: Optional[OutputCallback],
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.env = env
        self.cwd = cwd
        self.abort_event = abort_event
        self.on_output = on_output
        self.timeout_error = f"timed out after {timeout_seconds:g} s"
        self._deadline = time.monotonic() + timeout_seconds

    def which(self, program: str) -> Optional[str]:
        """Find program on the PATH that the commands run with."""

        return shutil.which(program, path=self.env.get("PATH", ""))

    def missing_program(self, name: str, program: str) -> StepResult:
        return StepResult(name=name, error=f"{program!r} was not found on PATH {self.env.get('PATH', '')}")

    def run(self, argv: List[str], name: str, forward_output: bool = True) -> StepResult:
        """Run argv within the group's remaining time; `forward_output=False` keeps its output from on_output."""

        if self.abort_event is not None and self.abort_event.is_set():
            return StepResult(name=name, error="aborted")
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return StepResult(name=name, error=self.timeout_error)
        return run_process(
            argv,
            name=name,
            timeout_seconds=remaining,
            env=self.env,
            cwd=self.cwd,
            abort_event=self.abort_event,
            on_output=self.on_output if forward_output else None,
            timeout_error=self.timeout_error,
        )


def apt_install_options(lock_timeout_seconds: int) -> List[str]:
    """Return the apt-get install options: no questions, old config files kept, a bounded wait for the dpkg lock."""

    return [*APT_NONINTERACTIVE_OPTIONS, "-o", f"DPkg::Lock::Timeout={lock_timeout_seconds}"]


def _apt_environment(env: Dict[str, str]) -> Dict[str, str]:
    apt_env = {key: value for key, value in env.items() if key != "LANGUAGE"}
    apt_env.update(APT_ENVIRONMENT)
    return apt_env


def _install_apt(group: AptPackages, runner: _GroupRunner, lock_timeout_seconds: int) -> List[StepResult]:
    """Check dpkg's state, then run `apt-get install`, replacing the error of a known failure with its cause and fix."""

    name = "apt-get install"
    apt_get = runner.which("apt-get")
    if apt_get is None:
        return [runner.missing_program(name, "apt-get")]

    dpkg_problem = _check_dpkg_state(runner, name)
    if dpkg_problem is not None:
        return [dpkg_problem]

    argv = [apt_get, "install", *apt_install_options(lock_timeout_seconds), "--", *_package_specs(group, "=")]
    result = runner.run(argv, name)
    result.error = _explain_apt_error(result, lock_timeout_seconds, runner.timeout_error)
    # A dpkg lock held by another process (an unattended upgrade, say) is usually released later.
    result.transient = result.error is not None and is_apt_lock_failure(result.output)
    return [result]


def _check_dpkg_state(runner: _GroupRunner, name: str) -> Optional[StepResult]:
    """Return a failed step when `dpkg --audit` reports unfinished packages, else None.

    apt-get would try to configure such packages again and fail with an error
    about them rather than about the request. While another process holds a
    dpkg lock, unfinished packages may be that process's install in progress,
    so they are let through and apt-get waits for the lock.
    """

    dpkg = runner.which("dpkg")
    if dpkg is None:
        logger.warning(
            "dpkg is not on PATH %s, so apt-get runs without checking for unfinished packages",
            runner.env.get("PATH", ""),
        )
        return None

    audit = runner.run([dpkg, "--audit"], "dpkg --audit", forward_output=False)
    if audit.error in ("aborted", runner.timeout_error):
        audit.name = name
        return audit

    if not _audit_found_problems(audit):
        return None

    holder = find_lock_holder()
    if holder is not None:
        logger.info(
            "dpkg --audit lists unfinished packages while %s holds %s, so they may be its install and apt-get waits",
            holder.describe(),
            holder.path,
        )
        return None

    error = describe_unfinished_packages(audit.output)
    logger.error("Not running apt-get: %s", error)
    return StepResult(name=name, duration_seconds=audit.duration_seconds, output=audit.output, error=error)


def _audit_found_problems(audit: StepResult) -> bool:
    """Check whether `dpkg --audit` listed problems.

    dpkg 1.21 prints the problems and exits with status 0. An exit status of
    1 with indented package lines is taken as the same report, and any other
    failure is logged and lets apt-get run.
    """

    if audit.exit_code == 0:
        return bool(audit.output.strip())
    if audit.exit_code == 1 and unfinished_packages(audit.output):
        return True

    logger.warning("dpkg --audit failed (%s), so apt-get runs without checking for unfinished packages", audit.error)
    return False


def _explain_apt_error(result: StepResult, lock_timeout_seconds: int, timeout_error: str) -> Optional[str]:
    """Return the step's error, replaced by a specific one when apt-get's output shows a known cause."""

    if result.error is None or result.error == "aborted":
        return result.error

    if result.error == timeout_error:
        return describe_apt_lock_timeout(result.output, result.error) or result.error

    # apt before 1.9 has no lock timeout and fails at once, so the wait
    # reported is the shorter of the option and the run's duration.
    lock_wait_seconds = min(lock_timeout_seconds, result.duration_seconds)
    explained = (
        describe_apt_lock_failure(result.output, lock_wait_seconds)
        or describe_dpkg_interrupted(result.output)
        or describe_missing_apt_packages(result.output)
    )
    return explained or result.error


def _package_specs(group: PackageGroup, separator: str) -> List[str]:
    """Return `name` or `name<separator>version` for each package of the group."""

    specs = []
    for package in group.packages:
        if package.version is None:
            specs.append(package.name)
        else:
            specs.append(f"{package.name}{separator}{package.version}")
    return specs


def _install_pip(
    manager: str, group: PipPackages, runner: _GroupRunner, device_root: Optional[str]
) -> List[StepResult]:
    """Install with `<interpreter> -m pip`, creating the virtualenv first when it is missing."""

    name = f"{manager} install"
    steps = []
    if group.virtualenv is None:
        interpreter = runner.which(PIP_INTERPRETERS[manager])
        if interpreter is None:
            return [runner.missing_program(name, PIP_INTERPRETERS[manager])]
    else:
        try:
            virtualenv = map_device_path(group.virtualenv, device_root)
        except ValueError as error:
            return [StepResult(name=name, error=str(error))]
        interpreter = os.path.join(virtualenv, "bin", "python")
        if not os.path.exists(interpreter):
            creation = _create_virtualenv(manager, group.virtualenv, virtualenv, runner)
            steps.append(creation)
            if creation.error is not None:
                return steps

    description = _describe_interpreter(interpreter, runner)
    argv = [interpreter, "-m", "pip", "install", *PIP_INSTALL_OPTIONS, "--", *_package_specs(group, "==")]
    install = _with_interpreter(runner.run(argv, name), description)

    # pip ignores the PEP 668 marker inside a virtualenv, so only a system
    # interpreter can reject the install this way.
    if install.error is not None and group.virtualenv is None and is_externally_managed_error(install.output):
        install.error = describe_externally_managed(manager, interpreter)
    steps.append(install)
    return steps


def _describe_interpreter(interpreter: str, runner: _GroupRunner) -> str:
    """Describe the interpreter with its real path and the output of `--version`, run within the group's time."""

    version = runner.run([interpreter, "--version"], f"{interpreter} --version", forward_output=False)
    return describe_interpreter(interpreter, version.output, version.error)


def _with_interpreter(result: StepResult, description: str) -> StepResult:
    """Record the interpreter on the step, in its interpreter field and as the first line of its output."""

    result.interpreter = description
    result.output = f"interpreter: {description}\n{result.output}"
    return result


def _create_virtualenv(manager: str, device_path: str, virtualenv: str, runner: _GroupRunner) -> StepResult:
    name = f"{manager}: create virtualenv {device_path}"
    creator = runner.which(VIRTUALENV_CREATOR)
    if creator is None:
        return runner.missing_program(name, VIRTUALENV_CREATOR)

    description = _describe_interpreter(creator, runner)
    return _with_interpreter(runner.run([creator, "-m", "venv", virtualenv], name), description)


def _install_npm(group: NpmPackages, runner: _GroupRunner, device_root: Optional[str]) -> List[StepResult]:
    """Install globally, or with `--prefix` into the group's directory, creating it when missing."""

    name = "npm install"
    npm = runner.which("npm")
    if npm is None:
        return [runner.missing_program(name, "npm")]

    steps = []
    if group.directory is None:
        location = ["-g"]
    else:
        try:
            directory = map_device_path(group.directory, device_root)
        except ValueError as error:
            return [StepResult(name=name, error=str(error))]
        if not os.path.isdir(directory):
            creation = _create_npm_directory(group.directory, directory)
            steps.append(creation)
            if creation.error is not None:
                return steps
        location = ["--prefix", directory]

    specs = _package_specs(group, "@")
    result = runner.run([npm, "install", *NPM_INSTALL_OPTIONS, *location, "--", *specs], name)
    if result.error is not None and result.error != "aborted" and group.directory is not None:
        result.error = f"{result.error} in npm project directory {directory}"
    steps.append(result)
    return steps


def _create_npm_directory(device_path: str, directory: str) -> StepResult:
    """Create a missing npm project directory (mode 0755 for each new level), as a step of its own."""

    name = f"npm: create directory {device_path}"
    started = time.monotonic()
    try:
        os.makedirs(directory, mode=0o755)
    except OSError as error:
        return StepResult(name=name, duration_seconds=time.monotonic() - started, error=str(error))

    logger.info("Created npm directory %s", directory)
    return StepResult(
        name=name,
        duration_seconds=time.monotonic() - started,
        output=f"created missing directory {directory}\n",
    )


def install_dependencies(
    dependencies: Dependencies,
    *,
    device_root: Optional[str],
    env: Dict[str, str],
    abort_event: Optional[threading.Event] = None,
    on_output: Optional[OutputCallback] = None,
    apt_lock_timeout_seconds: Optional[int] = None,
) -> List[StepResult]:
    """Install apt, pip, pip3 and npm packages in that order, stopping at the first failed step.

    `env` is the whole environment of the commands. apt-get and dpkg also get
    APT_ENVIRONMENT (no prompts, untranslated messages), and apt-get waits up
    to `apt_lock_timeout_seconds` (default: the recipe's `apt.lock_timeout_seconds`) for a dpkg lock that another process holds.
    The device root maps the virtualenv and npm directory paths and is the
    working directory.
    NOTE: apt, pip without a virtualenv and global npm change this machine
    itself even when a device root is set.
    """

    cwd = device_root or "/"
    steps: List[StepResult] = []

    def runner_for(timeout_seconds: float, manager_env: Dict[str, str]) -> _GroupRunner:
        return _GroupRunner(timeout_seconds, manager_env, cwd, abort_event, on_output)

    if dependencies.apt is not None and dependencies.apt.packages:
        apt_runner = runner_for(dependencies.apt.timeout_seconds, _apt_environment(env))
        lock_timeout_seconds = apt_lock_timeout_seconds or dependencies.apt.lock_timeout_seconds
        steps.extend(_install_apt(dependencies.apt, apt_runner, lock_timeout_seconds))
        if steps[-1].error is not None:
            return steps

    for manager in ("pip", "pip3"):
        group = getattr(dependencies, manager)
        if group is None or not group.packages:
            continue
        steps.extend(_install_pip(manager, group, runner_for(group.timeout_seconds, env), device_root))
        if steps[-1].error is not None:
            return steps

    if dependencies.npm is not None and dependencies.npm.packages:
        steps.extend(_install_npm(dependencies.npm, runner_for(dependencies.npm.timeout_seconds, env), device_root))

    return steps
