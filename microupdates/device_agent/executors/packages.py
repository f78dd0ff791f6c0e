"""The dependencies stage: apt, pip, pip3 and npm packages, installed without prompts.

Each manager's packages go to one install command, run through run_process,
so they get stdin from /dev/null, their own process group and a timeout. A
manager's timeout_seconds bounds all of its commands together, including
creating a virtualenv or directory first. Package names and versions are argv
entries, never shell text.
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
from microupdates.protocol.device_api import StepResult
from microupdates.protocol.recipe import AptPackages, Dependencies, NpmPackages, PackageGroup, PipPackages

logger = logging.getLogger(__name__)

# The dpkg options keep changed configuration files without asking. apt-get
# waits this long for the dpkg lock of another apt run instead of failing at once.
APT_LOCK_TIMEOUT_SECONDS = 120
APT_INSTALL_OPTIONS = [
    "-y",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
    "-o",
    f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_SECONDS}",
]
APT_ENVIRONMENT = {
    "DEBIAN_FRONTEND": "noninteractive",
    "NEEDRESTART_MODE": "a",
    "APT_LISTCHANGES_FRONTEND": "none",
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
        self._deadline = time.monotonic() + timeout_seconds

    def which(self, program: str) -> Optional[str]:
        """Find program on the PATH that the commands run with."""

        return shutil.which(program, path=self.env.get("PATH", ""))

    def missing_program(self, name: str, program: str) -> StepResult:
        return StepResult(name=name, error=f"{program!r} was not found on PATH {self.env.get('PATH', '')}")

    def run(self, argv: List[str], name: str) -> StepResult:
        if self.abort_event is not None and self.abort_event.is_set():
            return StepResult(name=name, error="aborted")
        timeout_error = f"timed out after {self.timeout_seconds:g} s"
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return StepResult(name=name, error=timeout_error)
        return run_process(
            argv,
            name=name,
            timeout_seconds=remaining,
            env=self.env,
            cwd=self.cwd,
            abort_event=self.abort_event,
            on_output=self.on_output,
            timeout_error=timeout_error,
        )


def _install_apt(group: AptPackages, runner: _GroupRunner) -> List[StepResult]:
    name = "apt-get install"
    apt_get = runner.which("apt-get")
    if apt_get is None:
        return [runner.missing_program(name, "apt-get")]

    specs = _package_specs(group, "=")
    return [runner.run([apt_get, "install", *APT_INSTALL_OPTIONS, *specs], name)]


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

    steps = []
    if group.virtualenv is None:
        interpreter = runner.which(PIP_INTERPRETERS[manager])
        if interpreter is None:
            return [runner.missing_program(f"{manager} install", PIP_INTERPRETERS[manager])]
    else:
        try:
            virtualenv = map_device_path(group.virtualenv, device_root)
        except ValueError as error:
            return [StepResult(name=f"{manager} install", error=str(error))]
        interpreter = os.path.join(virtualenv, "bin", "python")
        if not os.path.exists(interpreter):
            creation = _create_virtualenv(manager, group.virtualenv, virtualenv, runner)
            steps.append(creation)
            if creation.error is not None:
                return steps

    argv = [interpreter, "-m", "pip", "install", *PIP_INSTALL_OPTIONS, *_package_specs(group, "==")]
    install = runner.run(argv, f"{manager} install")
    install.interpreter = interpreter
    steps.append(install)
    return steps


def _create_virtualenv(manager: str, device_path: str, virtualenv: str, runner: _GroupRunner) -> StepResult:
    name = f"{manager}: create virtualenv {device_path}"
    creator = runner.which(VIRTUALENV_CREATOR)
    if creator is None:
        return runner.missing_program(name, VIRTUALENV_CREATOR)

    result = runner.run([creator, "-m", "venv", virtualenv], name)
    result.interpreter = creator
    return result


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
    steps.append(runner.run([npm, "install", *NPM_INSTALL_OPTIONS, *location, *specs], name))
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
) -> List[StepResult]:
    """Install apt, pip, pip3 and npm packages in that order, stopping at the first failed step.

    `env` is the whole environment of the commands, and apt-get also gets
    DEBIAN_FRONTEND=noninteractive, NEEDRESTART_MODE=a and
    APT_LISTCHANGES_FRONTEND=none. The device root maps the virtualenv and npm
    directory paths and is the working directory.
    NOTE: apt, pip without a virtualenv and global npm change this machine
    itself even when a device root is set.
    """

    cwd = device_root or "/"
    steps: List[StepResult] = []

    def runner_for(timeout_seconds: float, manager_env: Dict[str, str]) -> _GroupRunner:
        return _GroupRunner(timeout_seconds, manager_env, cwd, abort_event, on_output)

    if dependencies.apt is not None and dependencies.apt.packages:
        apt_env = {**env, **APT_ENVIRONMENT}
        steps.extend(_install_apt(dependencies.apt, runner_for(dependencies.apt.timeout_seconds, apt_env)))
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
