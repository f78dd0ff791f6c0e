"""Package versions recorded by the dependencies stage and the revert_packages compensation.

The apt cases run against fake dpkg-query and apt-get scripts that keep a
package database in files, so they need neither root nor a package mirror.
The pip and npm cases install real packages from PyPI and the npm registry
into temporary virtualenvs and directories. One case runs the real apt-get
as root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional

import pytest

from microupdates.device_agent.change_log import ChangeLog, ManagerRecord, PackagesRecord, PackageVersion
from microupdates.device_agent.executors.commands import MINIMAL_PATH, minimal_environment
from microupdates.device_agent.executors.package_versions import VersionQuery, query_apt_versions
from microupdates.device_agent.stages import StageContext, run_stage
from microupdates.protocol.device_api import StageJob
from microupdates.protocol.recipe import Dependencies
from tests.agent.test_packages import NETWORK_VARIABLES

DEPLOYMENT_ID = "dep-packages"

npm_path = shutil.which("npm", path=MINIMAL_PATH)
python3_path = shutil.which("python3", path=MINIMAL_PATH)
apt_get_path = shutil.which("apt-get", path=MINIMAL_PATH)
dpkg_query_path = shutil.which("dpkg-query", path=MINIMAL_PATH)

FAKE_DPKG_QUERY = """#!/bin/bash
# Fake dpkg-query -W -f=FORMAT NAME...: one file per installed package in $FAKE_DPKG_DB.
shift 2
status=0
for name in "$@"; do
    if [ -f "$FAKE_DPKG_DB/$name" ]; then
        printf '%s\\t%s\\t%s\\n' "$name" "${FAKE_DPKG_STATUS:-install ok installed}" "$(cat "$FAKE_DPKG_DB/$name")"
    else
        echo "dpkg-query: no packages found matching $name" >&2
        status=1
    fi
done
exit $status
"""

FAKE_APT_GET = """#!/bin/bash
# Fake apt-get: logs its arguments and changes the package files in $FAKE_DPKG_DB.
echo "$*" >> "$FAKE_DPKG_DB.calls"
spec="${@: -1}"
name="${spec%%=*}"
case "$1" in
    remove)
        [ -n "$FAKE_APT_IGNORE" ] || rm -f "$FAKE_DPKG_DB/$name"
        ;;
    install)
        version="${spec#*=}"
        if [ "$version" = "$FAKE_APT_UNAVAILABLE" ]; then
            echo "E: Version '$version' for '$name' was not found"
            exit 100
        fi
        [ -n "$FAKE_APT_IGNORE" ] || echo "$version" > "$FAKE_DPKG_DB/$name"
        ;;
esac
"""


def _network_variables() -> Dict[str, str]:
    return {name: os.environ[name] for name in NETWORK_VARIABLES if name in os.environ}


def _job(stage: str, dependencies: Optional[dict] = None) -> StageJob:
    return StageJob(
        job_id=1,
        deployment_id=DEPLOYMENT_ID,
        device_id="dev-1",
        update_version="2.0.0",
        stage=stage,
        progress_interval_seconds=10,
        dependencies=Dependencies.model_validate(dependencies) if dependencies is not None else None,
    )


def _context(root: Path, state: Path, extra_env: Optional[Dict[str, str]] = None, **fields) -> StageContext:
    def no_artifacts(digest: str) -> str:
        raise AssertionError(f"unexpected artifact request {digest}")

    return StageContext(
        device_root=str(root),
        open_artifact=no_artifacts,
        state_dir=str(state),
        extra_env=extra_env if extra_env is not None else _network_variables(),
        **fields,
    )


class FakeApt:
    """Fake dpkg-query and apt-get on a PATH of their own, with packages kept as files."""

    def __init__(self, directory: Path) -> None:
        self.bin = directory / "bin"
        self.bin.mkdir(parents=True)
        self.database = directory / "dpkg"
        self.database.mkdir()
        for name, script in (("dpkg-query", FAKE_DPKG_QUERY), ("apt-get", FAKE_APT_GET)):
            path = self.bin / name
            path.write_text(script)
            path.chmod(0o755)

    def install(self, name: str, version: str) -> None:
        (self.database / name).write_text(version)

    def version(self, name: str) -> Optional[str]:
        path = self.database / name
        return path.read_text().strip() if path.exists() else None

    def calls(self):
        calls_file = Path(f"{self.database}.calls")
        return calls_file.read_text().splitlines() if calls_file.exists() else []

    def env(self, **settings: str) -> Dict[str, str]:
        return {"PATH": f"{self.bin}:{MINIMAL_PATH}", "FAKE_DPKG_DB": str(self.database), **settings}


@pytest.fixture
def root(tmp_path):
    device_root = tmp_path / "device"
    device_root.mkdir()
    return device_root


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def fake_apt(tmp_path):
    return FakeApt(tmp_path / "fake-apt")


def _write_apt_record(state: Path, *packages: PackageVersion) -> None:
    record = PackagesRecord(managers=[ManagerRecord(manager="apt", timeout_seconds=30, packages=list(packages))])
    ChangeLog(str(state), DEPLOYMENT_ID).append_packages(record)


def test_query_apt_versions_reads_dpkg_status(fake_apt, root):
    fake_apt.install("hello", "2.10-3")
    query = VersionQuery(minimal_environment(fake_apt.env(), None), str(root), None)

    versions = query_apt_versions(["hello", "absent-package"], query)

    assert versions["hello"] == PackageVersion(name="hello", version="2.10-3")
    assert versions["absent-package"] == PackageVersion(name="absent-package")


@pytest.mark.parametrize(
    "status, expected",
    [("hold ok installed", "1.0"), ("install ok triggers-pending", "1.0"), ("deinstall ok config-files", None)],
)
def test_query_apt_versions_dpkg_states(fake_apt, root, status, expected):
    fake_apt.install("tool", "1.0")
    query = VersionQuery(minimal_environment(fake_apt.env(FAKE_DPKG_STATUS=status), None), str(root), None)

    assert query_apt_versions(["tool"], query)["tool"].version == expected


def test_query_apt_versions_without_dpkg_query(root, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    query = VersionQuery(minimal_environment({"PATH": str(empty)}, None), str(root), None)

    versions = query_apt_versions(["hello"], query)

    assert versions["hello"].error == f"'dpkg-query' was not found on PATH {empty}"


def test_dependencies_stage_records_apt_versions(fake_apt, root, state):
    fake_apt.install("curl", "7.88")
    job = _job("dependencies", {"apt": {"packages": [{"name": "curl"}, {"name": "jq", "version": "1.6"}]}})

    report = run_stage(job, _context(root, state, fake_apt.env()))

    assert report.steps[0].name == "record package versions"
    assert report.steps[0].output == "apt curl: 7.88\napt jq: not installed\n"
    [(_, record)] = ChangeLog(str(state), DEPLOYMENT_ID).read_packages()
    assert record.managers[0].packages == [
        PackageVersion(name="curl", version="7.88"),
        PackageVersion(name="jq"),
    ]


def test_revert_packages_apt_removes_and_downgrades(fake_apt, root, state):
    _write_apt_record(state, PackageVersion(name="jq"), PackageVersion(name="curl", version="7.74"))
    fake_apt.install("jq", "1.6")
    fake_apt.install("curl", "7.88")

    report = run_stage(_job("revert_packages"), _context(root, state, fake_apt.env()))

    assert report.status == "succeeded", report.error
    assert [step.name for step in report.steps] == ["apt: restore curl 7.74", "apt: remove jq"]
    assert fake_apt.version("jq") is None
    assert fake_apt.version("curl") == "7.74"
    options = "-y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -o DPkg::Lock::Timeout=120"
    assert fake_apt.calls() == [f"install {options} --allow-downgrades -- curl=7.74", f"remove {options} -- jq"]


def test_revert_packages_apt_version_unavailable(fake_apt, root, state):
    _write_apt_record(state, PackageVersion(name="curl", version="7.74"))
    fake_apt.install("curl", "7.88")

    report = run_stage(_job("revert_packages"), _context(root, state, fake_apt.env(FAKE_APT_UNAVAILABLE="7.74")))

    assert report.status == "failed"
    assert report.error == (
        "apt: restore curl 7.74: could not restore apt package curl to version 7.74: that version is no longer "
        "available from the configured apt sources (exited with status 100)"
    )
    assert report.exit_code == 100


def test_revert_packages_apt_success_without_effect_fails(fake_apt, root, state):
    _write_apt_record(state, PackageVersion(name="jq"))
    fake_apt.install("jq", "1.6")

    report = run_stage(_job("revert_packages"), _context(root, state, fake_apt.env(FAKE_APT_IGNORE="1")))

    assert report.status == "failed"
    assert report.error == (
        "apt: remove jq: could not remove apt package jq, which the update installed: "
        "the command succeeded, but jq is now 1.6 (was 1.6 before the revert)"
    )


def test_revert_packages_unrecorded_version_fails(fake_apt, root, state):
    _write_apt_record(state, PackageVersion(name="curl", error="dpkg-query timed out after 120 s"))

    report = run_stage(_job("revert_packages"), _context(root, state, fake_apt.env()))

    assert report.status == "failed"
    assert report.error == (
        "apt: restore curl: cannot revert apt package curl, because its version before the update was not "
        "recorded: dpkg-query timed out after 120 s"
    )


def test_revert_packages_is_idempotent(fake_apt, root, state):
    _write_apt_record(state, PackageVersion(name="jq"))
    fake_apt.install("jq", "1.6")

    first = run_stage(_job("revert_packages"), _context(root, state, fake_apt.env()))
    second = run_stage(_job("revert_packages"), _context(root, state, fake_apt.env()))

    assert first.status == "succeeded"
    assert second.status == "succeeded"
    assert [step.output for step in second.steps] == ["nothing to revert\n"]
    assert len(fake_apt.calls()) == 1


def test_revert_packages_retries_after_failure(fake_apt, root, state):
    _write_apt_record(state, PackageVersion(name="jq"), PackageVersion(name="curl", version="7.74"))
    fake_apt.install("jq", "1.6")
    fake_apt.install("curl", "7.88")

    failed = run_stage(_job("revert_packages"), _context(root, state, fake_apt.env(FAKE_APT_UNAVAILABLE="7.74")))
    retried = run_stage(_job("revert_packages"), _context(root, state, fake_apt.env()))

    assert failed.status == "failed"
    assert fake_apt.version("jq") is None
    assert retried.status == "succeeded", retried.error
    assert [step.name for step in retried.steps] == ["apt: restore curl 7.74"]
    assert fake_apt.version("curl") == "7.74"


def test_revert_packages_without_state_dir_fails(root):
    context = StageContext(device_root=str(root), open_artifact=lambda digest: digest)

    report = run_stage(_job("revert_packages"), context)

    assert report.status == "failed"
    assert report.error == (
        "revert_packages: the revert_packages stage cannot undo anything, because the agent has no state "
        "directory, so rollback recording was off and no change of this deployment was recorded"
    )


def _pip_show_version(python: Path, name: str) -> Optional[str]:
    completed = subprocess.run(
        [str(python), "-m", "pip", "show", name], capture_output=True, text=True, timeout=60, check=False
    )
    for line in completed.stdout.splitlines():
        if line.startswith("Version: "):
            return line[len("Version: "):]
    return None


@pytest.mark.skipif(python3_path is None, reason="python3 is not on the minimal PATH")
def test_revert_packages_pip_restores_virtualenv(root, state):
    venv = root / "opt/venv"
    subprocess.run([python3_path, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin/python"
    network_env = minimal_environment(_network_variables(), None)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--", "six==1.15.0"],
        env=network_env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    pip3 = {"virtualenv": "/opt/venv", "packages": [{"name": "six", "version": "1.16.0"}, {"name": "iniconfig"}]}

    update = run_stage(_job("dependencies", {"pip3": pip3}), _context(root, state))

    assert update.status == "succeeded", update.error
    assert update.steps[0].output == "pip3 six: 1.15.0\npip3 iniconfig: not installed\n"
    assert _pip_show_version(python, "six") == "1.16.0"
    assert _pip_show_version(python, "iniconfig") is not None

    revert = run_stage(_job("revert_packages"), _context(root, state))

    assert revert.status == "succeeded", revert.error
    assert [step.name for step in revert.steps] == ["pip3: remove iniconfig", "pip3: restore six 1.15.0"]
    assert _pip_show_version(python, "six") == "1.15.0"
    assert _pip_show_version(python, "iniconfig") is None


@pytest.mark.skipif(python3_path is None, reason="python3 is not on the minimal PATH")
def test_revert_packages_pip_removes_created_virtualenv(root, state):
    pip3 = {"virtualenv": "/srv/tools/venv", "packages": [{"name": "six", "version": "1.16.0"}]}

    update = run_stage(_job("dependencies", {"pip3": pip3}), _context(root, state))

    assert update.status == "succeeded", update.error
    assert (root / "srv/tools/venv/bin/python").exists()

    revert = run_stage(_job("revert_packages"), _context(root, state))

    assert revert.status == "succeeded", revert.error
    assert [step.name for step in revert.steps] == [f"pip3: remove virtualenv {root / 'srv/tools/venv'}"]
    assert not (root / "srv").exists()


def _npm_version(project: Path, name: str) -> Optional[str]:
    manifest = project / "node_modules" / name / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.exists() else None


@pytest.mark.skipif(npm_path is None, reason="npm is not on the minimal PATH, so the npm registry test cannot run")
def test_revert_packages_npm_restores_directory(root, state):
    project = root / "srv/web"
    project.mkdir(parents=True)
    subprocess.run(
        [npm_path, "install", "--no-audit", "--no-fund", "--prefix", str(project), "--", "is-number@6.0.0"],
        env=minimal_environment(_network_variables(), None),
        check=True,
        capture_output=True,
        timeout=300,
    )
    npm = {"directory": "/srv/web", "packages": [{"name": "is-number", "version": "7.0.0"}]}

    update = run_stage(_job("dependencies", {"npm": npm}), _context(root, state))

    assert update.status == "succeeded", update.error
    assert update.steps[0].output == "npm is-number: 6.0.0\n"
    assert _npm_version(project, "is-number") == "7.0.0"

    revert = run_stage(_job("revert_packages"), _context(root, state))

    assert revert.status == "succeeded", revert.error
    assert [step.name for step in revert.steps] == ["npm: restore is-number 6.0.0"]
    assert _npm_version(project, "is-number") == "6.0.0"


@pytest.mark.skipif(npm_path is None, reason="npm is not on the minimal PATH, so the npm registry test cannot run")
def test_revert_packages_npm_removes_created_directory(root, state):
    npm = {"directory": "/srv/web", "packages": [{"name": "is-number", "version": "7.0.0"}]}

    update = run_stage(_job("dependencies", {"npm": npm}), _context(root, state))
    revert = run_stage(_job("revert_packages"), _context(root, state))

    assert update.status == "succeeded", update.error
    assert revert.status == "succeeded", revert.error
    assert [step.name for step in revert.steps] == [f"npm: remove npm directory {root / 'srv/web'}"]
    assert not (root / "srv").exists()


def _dpkg_version(name: str) -> Optional[str]:
    assert dpkg_query_path is not None
    completed = subprocess.run(
        [dpkg_query_path, "-W", "-f=${Status} ${Version}", name], capture_output=True, text=True, timeout=60
    )
    words = completed.stdout.split()
    return words[3] if completed.returncode == 0 and words[2:3] == ["installed"] else None


@pytest.mark.skipif(apt_get_path is None or dpkg_query_path is None, reason="apt-get or dpkg-query is missing")
@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get install and remove need root")
def test_revert_packages_real_apt_hello(root, state):
    """Install `hello` and revert; when it is installed already, check that revert leaves it alone."""

    installed_before = _dpkg_version("hello")
    job = _job("dependencies", {"apt": {"packages": [{"name": "hello"}]}})

    update = run_stage(job, _context(root, state))
    revert = run_stage(_job("revert_packages"), _context(root, state))

    assert update.status == "succeeded", update.error
    assert revert.status == "succeeded", revert.error
    if installed_before is None:
        assert [step.name for step in revert.steps] == ["apt: remove hello"]
        assert _dpkg_version("hello") is None
    else:
        assert update.steps[0].output == f"apt hello: {installed_before}\n"
        assert revert.steps[0].output == f"nothing to revert\napt hello: {installed_before}, unchanged\n"
        assert _dpkg_version("hello") == installed_before
