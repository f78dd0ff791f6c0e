"""Dependency installs with the real package managers.

The pip and npm tests download small packages from PyPI and the npm registry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from microupdates.device_agent.executors.commands import MINIMAL_PATH, minimal_environment
from microupdates.device_agent.executors.packages import install_dependencies
from microupdates.protocol.recipe import Dependencies

# Some machines reach the registries through a TLS-intercepting proxy whose
# CA certificate these variables name. minimal_environment() drops the
# agent's environment, so the tests pass them on as extra variables, the way
# an operator configures an agent behind such a proxy.
NETWORK_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
)

npm_path = shutil.which("npm", path=MINIMAL_PATH)
python3_path = shutil.which("python3", path=MINIMAL_PATH)
apt_get_path = shutil.which("apt-get", path=MINIMAL_PATH)


def _network_env():
    extra = {name: os.environ[name] for name in NETWORK_VARIABLES if name in os.environ}
    return minimal_environment(extra, None)


def _install(dependencies: dict, tmp_path, env=None):
    return install_dependencies(
        Dependencies.model_validate(dependencies),
        device_root=str(tmp_path),
        env=env if env is not None else _network_env(),
    )


def test_install_dependencies_empty_does_nothing(tmp_path):
    assert _install({}, tmp_path) == []


@pytest.mark.skipif(python3_path is None, reason="python3 is not on the minimal PATH")
def test_install_dependencies_pip_into_new_virtualenv(tmp_path):
    pip3 = {"virtualenv": "/opt/venv", "packages": [{"name": "six", "version": "1.16.0"}]}

    steps = _install({"pip3": pip3}, tmp_path)

    venv_python = tmp_path / "opt/venv/bin/python"
    assert [step.name for step in steps] == ["pip3: create virtualenv /opt/venv", "pip3 install"]
    assert steps[0].error is None, steps[0].output
    assert steps[0].interpreter.startswith(f"{python3_path} ")
    assert steps[1].error is None, steps[1].output
    assert steps[1].interpreter.startswith(f"{venv_python} ")
    assert steps[1].exit_code == 0

    imported = subprocess.run(
        [str(venv_python), "-c", "import six; print(six.__version__)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert imported.stdout == "1.16.0\n"


@pytest.mark.skipif(python3_path is None, reason="python3 is not on the minimal PATH")
def test_install_dependencies_pip_reuses_existing_virtualenv(tmp_path):
    subprocess.run([python3_path, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)

    steps = _install({"pip": {"virtualenv": "/venv", "packages": [{"name": "six", "version": "1.16.0"}]}}, tmp_path)

    assert [step.name for step in steps] == ["pip install"]
    assert steps[0].error is None, steps[0].output
    assert steps[0].interpreter.startswith(str(tmp_path / "venv/bin/python") + " ")


def test_install_dependencies_pip_interpreter_missing(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = minimal_environment({"PATH": str(empty_bin)}, None)

    steps = _install({"pip": {"packages": [{"name": "six"}]}}, tmp_path, env=env)

    assert len(steps) == 1
    assert steps[0].error == f"'python' was not found on PATH {empty_bin}"


def test_install_dependencies_pip_failure_stops_before_npm(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_python = fake_bin / "python3"
    fake_python.write_text('#!/bin/bash\necho "pip args: $*"\nexit 3\n')
    fake_python.chmod(0o755)
    env = minimal_environment({"PATH": f"{fake_bin}:{MINIMAL_PATH}"}, None)

    steps = _install(
        {"pip3": {"packages": [{"name": "six", "version": "1.16.0"}]}, "npm": {"packages": [{"name": "is-number"}]}},
        tmp_path,
        env=env,
    )

    assert [step.name for step in steps] == ["pip3 install"]
    assert steps[0].error == "exited with status 3"
    assert steps[0].interpreter == f"{fake_python} (--version failed: exited with status 3)"
    assert steps[0].output == (
        f"interpreter: {fake_python} (--version failed: exited with status 3)\n"
        "pip args: -m pip install --disable-pip-version-check --no-input -- six==1.16.0\n"
    )


def test_install_dependencies_apt_arguments_and_environment(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_apt = fake_bin / "apt-get"
    fake_apt.write_text('#!/bin/bash\necho "$*"\necho "$DEBIAN_FRONTEND $NEEDRESTART_MODE"\n')
    fake_apt.chmod(0o755)
    env = minimal_environment({"PATH": str(fake_bin), "DEBIAN_FRONTEND": "dialog"}, None)

    steps = _install({"apt": {"packages": [{"name": "curl"}, {"name": "jq", "version": "1.6-2"}]}}, tmp_path, env=env)

    assert [step.name for step in steps] == ["apt-get install"]
    assert steps[0].error is None
    assert steps[0].output.splitlines() == [
        "install -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
        "-o DPkg::Lock::Timeout=120 -- curl jq=1.6-2",
        "noninteractive a",
    ]


@pytest.mark.skipif(apt_get_path is None, reason="apt-get is not on the minimal PATH")
@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get install needs root")
def test_install_dependencies_apt_unknown_package_fails(tmp_path):
    steps = _install(
        {"apt": {"packages": [{"name": "microupdates-no-such-package"}]}, "pip3": {"packages": [{"name": "six"}]}},
        tmp_path,
    )

    assert [step.name for step in steps] == ["apt-get install"]
    assert steps[0].exit_code == 100
    assert steps[0].error.startswith("apt-get found no package microupdates-no-such-package in its package lists")
    assert "microupdates-no-such-package" in steps[0].output


def test_install_dependencies_timeout_is_reported(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_npm = fake_bin / "npm"
    fake_npm.write_text("#!/bin/bash\nsleep 30\n")
    fake_npm.chmod(0o755)
    env = minimal_environment({"PATH": f"{fake_bin}:{MINIMAL_PATH}"}, None)

    steps = _install({"npm": {"timeout_seconds": 1, "packages": [{"name": "is-number"}]}}, tmp_path, env=env)

    assert steps[-1].error == "timed out after 1 s"


@pytest.mark.skipif(npm_path is None, reason="npm is not on the minimal PATH, so the npm registry test cannot run")
def test_install_dependencies_npm_into_new_directory(tmp_path):
    npm = {"directory": "/srv/web", "packages": [{"name": "is-number", "version": "7.0.0"}]}

    steps = _install({"npm": npm}, tmp_path)

    project = tmp_path / "srv/web"
    assert [step.name for step in steps] == ["npm: create directory /srv/web", "npm install"]
    assert steps[0].error is None
    assert f"created missing directory {project}" in steps[0].output
    assert steps[1].error is None, steps[1].output
    package = json.loads((project / "node_modules/is-number/package.json").read_text())
    assert package["version"] == "7.0.0"
