"""Installed package versions, recorded before the dependencies stage and read again by revert_packages.

For each manager the version of every package the stage names is found
without changing anything:

- apt: one `dpkg-query -W` for all names. A package counts as installed
  when dpkg's status is "installed" or only waits for triggers, so a held
  package ("hold ok installed") counts too.
- pip and pip3: `<interpreter> -m pip show` on batches of names, with the
  interpreter that packages.py installs with: `<virtualenv>/bin/python`
  (device root applied) or `python` / `python3` found on the stage's PATH.
- npm: `<node_modules>/<name>/package.json`, where node_modules is below the
  group's directory, or the one `npm root -g` prints for global packages.

Every command runs through run_process with the stage's environment. A
version that cannot be found out is recorded with its error, and the install
goes ahead. revert_packages then reports that it cannot restore that package.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from typing import Dict, List, Optional, Sequence

from microupdates.device_agent.change_log import ManagerRecord, PackagesRecord, PackageVersion
from microupdates.device_agent.device_paths import map_device_path
from microupdates.device_agent.executors.commands import run_process
from microupdates.device_agent.executors.packages import PIP_INTERPRETERS
from microupdates.device_agent.filesystem import missing_directories
from microupdates.protocol.device_api import StepResult
from microupdates.protocol.recipe import Dependencies, PackageGroup, PipPackage

logger = logging.getLogger(__name__)

# Bound on each query command; they read local state only.
QUERY_TIMEOUT_SECONDS = 120
# Names per `pip show` run, so its output (a few hundred bytes per package)
# stays well below the bounded capture of run_process.
PIP_SHOW_BATCH_SIZE = 10
# dpkg status words (the third field of ${Status}) of a package whose files are in place.
DPKG_INSTALLED_STATES = ("installed", "triggers-awaited", "triggers-pending")
PIP_NOT_FOUND_WARNING = "Package(s) not found"
RECORD_STEP = "record package versions"


class VersionQuery:
    """Runs version queries with the stage's environment, working directory and abort event."""

    def __init__(self, env: Dict[str, str], cwd: str, abort_event: Optional[threading.Event]) -> None:
        self.env = env
        self.cwd = cwd
        self.abort_event = abort_event

    def which(self, program: str) -> Optional[str]:
        return shutil.which(program, path=self.env.get("PATH", ""))

    def not_found(self, program: str) -> str:
        return f"{program!r} was not found on PATH {self.env.get('PATH', '')}"

    def run(self, argv: List[str], name: str) -> StepResult:
        if self.abort_event is not None and self.abort_event.is_set():
            return StepResult(name=name, error="aborted")
        return run_process(
            argv,
            name=name,
            timeout_seconds=QUERY_TIMEOUT_SECONDS,
            env=self.env,
            cwd=self.cwd,
            abort_event=self.abort_event,
        )


def _failed_for_all(names: Sequence[str], error: str) -> Dict[str, PackageVersion]:
    return {name: PackageVersion(name=name, error=error) for name in names}


def _last_output_line(result: StepResult) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _describe_failure(command: str, result: StepResult) -> str:
    detail = _last_output_line(result)
    return f"{command} failed: {result.error}" + (f": {detail}" if detail else "")


def query_apt_versions(names: Sequence[str], query: VersionQuery) -> Dict[str, PackageVersion]:
    """Return the installed version of each Debian package, or version None when it is not installed."""

    if not names:
        return {}
    dpkg_query = query.which("dpkg-query")
    if dpkg_query is None:
        return _failed_for_all(names, query.not_found("dpkg-query"))

    argv = [dpkg_query, "-W", "-f=${Package}\\t${Status}\\t${Version}\\n", "--", *names]
    result = query.run(argv, "dpkg-query")
    # dpkg-query exits with status 1 when some names match no package, which means not installed.
    if result.error is not None and result.exit_code != 1:
        return _failed_for_all(names, _describe_failure("dpkg-query", result))

    installed: Dict[str, str] = {}
    for line in result.output.splitlines():
        fields = line.split("\t")
        if len(fields) != 3:
            continue
        package, status, version = fields
        status_words = status.split()
        if status_words and status_words[-1] in DPKG_INSTALLED_STATES:
            installed.setdefault(package, version)
    return {name: PackageVersion(name=name, version=installed.get(name)) for name in names}


def _parse_pip_show(output: str) -> Dict[str, str]:
    """Return {canonical name: version} from the `Name:` and `Version:` lines of `pip show`."""

    versions = {}
    name = None
    for line in output.splitlines():
        if line.startswith("Name: "):
            name = PipPackage.canonical_name(line[len("Name: "):].strip())
        elif line.startswith("Version: ") and name is not None:
            versions[name] = line[len("Version: "):].strip()
            name = None
    return versions


def query_pip_versions(
    interpreter: Optional[str], names: Sequence[str], query: VersionQuery
) -> Dict[str, PackageVersion]:
    """Return the version of each distribution in the interpreter's environment, or None when it is not installed."""

    if not names:
        return {}
    if interpreter is None or not os.path.exists(interpreter):
        return _failed_for_all(names, f"the Python interpreter {interpreter} does not exist")

    versions: Dict[str, PackageVersion] = {}
    for start in range(0, len(names), PIP_SHOW_BATCH_SIZE):
        batch = list(names[start:start + PIP_SHOW_BATCH_SIZE])
        argv = [interpreter, "-m", "pip", "show", "--disable-pip-version-check", "--", *batch]
        result = query.run(argv, f"{interpreter} -m pip show")
        # pip exits with status 1 when none of the names is installed, with a warning that lists them.
        if result.error is not None and PIP_NOT_FOUND_WARNING not in result.output:
            versions.update(_failed_for_all(batch, _describe_failure(f"{interpreter} -m pip show", result)))
            continue

        found = _parse_pip_show(result.output)
        for name in batch:
            versions[name] = PackageVersion(name=name, version=found.get(PipPackage.canonical_name(name)))
    return versions


def read_npm_versions(node_modules: str, names: Sequence[str]) -> Dict[str, PackageVersion]:
    """Return the version from each package's package.json under node_modules, or None when it has none."""

    versions = {}
    for name in names:
        manifest = os.path.join(node_modules, *name.split("/"), "package.json")
        try:
            with open(manifest, "rb") as reader:
                content = json.load(reader)
        except FileNotFoundError:
            versions[name] = PackageVersion(name=name)
            continue
        except (OSError, ValueError) as error:
            versions[name] = PackageVersion(name=name, error=f"could not read {manifest}: {error}")
            continue

        version = content.get("version") if isinstance(content, dict) else None
        if isinstance(version, str):
            versions[name] = PackageVersion(name=name, version=version)
        else:
            versions[name] = PackageVersion(name=name, error=f"{manifest} has no version")
    return versions


def find_npm_global_root(query: VersionQuery) -> Optional[str]:
    """Return the directory of global node modules that `npm root -g` prints, or None when npm fails."""

    npm = query.which("npm")
    if npm is None:
        return None
    result = query.run([npm, "root", "-g"], "npm root -g")
    if result.error is not None:
        logger.warning("npm root -g failed: %s", result.error)
        return None
    # npm may print warnings before the path, which comes last.
    root = _last_output_line(result)
    return root if root.startswith("/") else None


def query_manager_versions(
    record: ManagerRecord, names: Sequence[str], query: VersionQuery
) -> Dict[str, PackageVersion]:
    """Return the current versions of names in the place the manager record describes."""

    if record.manager == "apt":
        return query_apt_versions(names, query)
    if record.manager in PIP_INTERPRETERS:
        return query_pip_versions(record.interpreter, names, query)

    if record.npm_directory is not None:
        return read_npm_versions(os.path.join(record.npm_directory, "node_modules"), names)
    root = find_npm_global_root(query)
    if root is None:
        return _failed_for_all(names, "the global node_modules directory is unknown, because `npm root -g` failed")
    return read_npm_versions(root, names)


def _first_missing(path: str) -> Optional[str]:
    """Return the top-most missing directory of path, None when path exists or cannot be created."""

    try:
        missing = missing_directories(path)
    except NotADirectoryError:
        return None
    return missing[0] if missing else None


def _group_names(group: PackageGroup) -> List[str]:
    return [package.name for package in group.packages]


def _pip_record(manager: str, group, device_root: Optional[str], query: VersionQuery) -> ManagerRecord:
    record = ManagerRecord(manager=manager, timeout_seconds=group.timeout_seconds)
    names = _group_names(group)
    if group.virtualenv is None:
        record.interpreter = query.which(PIP_INTERPRETERS[manager])
        if record.interpreter is None:
            record.packages = list(_failed_for_all(names, query.not_found(PIP_INTERPRETERS[manager])).values())
            return record
        record.packages = list(query_pip_versions(record.interpreter, names, query).values())
        return record

    try:
        record.virtualenv = map_device_path(group.virtualenv, device_root)
    except ValueError as error:
        record.packages = list(_failed_for_all(names, str(error)).values())
        return record
    record.interpreter = os.path.join(record.virtualenv, "bin", "python")
    record.created_directory = _first_missing(record.virtualenv)
    if not os.path.exists(record.interpreter):
        # packages.py creates the virtualenv, so nothing is installed in it yet.
        record.packages = [PackageVersion(name=name) for name in names]
        return record
    record.packages = list(query_pip_versions(record.interpreter, names, query).values())
    return record


def _npm_record(group, device_root: Optional[str], query: VersionQuery) -> ManagerRecord:
    record = ManagerRecord(manager="npm", timeout_seconds=group.timeout_seconds)
    names = _group_names(group)
    if group.directory is not None:
        try:
            record.npm_directory = map_device_path(group.directory, device_root)
        except ValueError as error:
            record.packages = list(_failed_for_all(names, str(error)).values())
            return record
        record.created_directory = _first_missing(record.npm_directory)
    record.packages = list(query_manager_versions(record, names, query).values())
    return record


def record_package_versions(
    dependencies: Dependencies,
    *,
    device_root: Optional[str],
    env: Dict[str, str],
    abort_event: Optional[threading.Event] = None,
) -> PackagesRecord:
    """Find the version of every package the dependencies name, as installed now, without changing anything."""

    query = VersionQuery(env, device_root or "/", abort_event)
    record = PackagesRecord()

    if dependencies.apt is not None and dependencies.apt.packages:
        apt = ManagerRecord(manager="apt", timeout_seconds=dependencies.apt.timeout_seconds)
        apt.packages = list(query_apt_versions(_group_names(dependencies.apt), query).values())
        record.managers.append(apt)

    for manager in ("pip", "pip3"):
        group = getattr(dependencies, manager)
        if group is not None and group.packages:
            record.managers.append(_pip_record(manager, group, device_root, query))

    if dependencies.npm is not None and dependencies.npm.packages:
        record.managers.append(_npm_record(dependencies.npm, device_root, query))
    return record


def describe_version(version: PackageVersion) -> str:
    if version.error is not None:
        return f"unknown ({version.error})"
    return version.version if version.version is not None else "not installed"


def describe_packages_record(record: PackagesRecord) -> str:
    """Return one line per package, `manager name: version`, for the step output."""

    lines = []
    for manager in record.managers:
        for package in manager.packages:
            lines.append(f"{manager.manager} {package.name}: {describe_version(package)}\n")
    return "".join(lines)

