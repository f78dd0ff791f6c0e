"""Dependency installs that hit the common failures on a device, reproduced for real.

The apt tests run as root on a Debian machine. They build tiny packages with
dpkg-deb, serve them from a local file repository listed in
/etc/apt/sources.list.d/microupdates-test.list, take the real dpkg lock and
leave a package half-configured. Every fixture removes what it added: the
test packages, the list file and its downloaded lists, and the lock.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

from microupdates.device_agent.executors.commands import MINIMAL_PATH, minimal_environment
from microupdates.device_agent.executors.package_checks import (
    describe_apt_lock_failure,
    find_lock_holder,
    read_process_name,
)
from microupdates.device_agent.executors.packages import install_dependencies
from microupdates.protocol.recipe import Dependencies

from tests.agent.test_packages import NETWORK_VARIABLES

DPKG_FRONTEND_LOCK = "/var/lib/dpkg/lock-frontend"
TEST_LIST_FILE = "/etc/apt/sources.list.d/microupdates-test.list"
CONFFILE_PACKAGE = "microupdates-test-conffile"
SMALL_PACKAGE = "microupdates-test-small"
BROKEN_PACKAGE = "microupdates-test-broken"
TEST_PACKAGES = (CONFFILE_PACKAGE, SMALL_PACKAGE, BROKEN_PACKAGE)
CONFFILE = "/etc/microupdates-test/settings.conf"
LOCK_WAIT_SECONDS = 3
# Time allowed on top of the lock wait for apt-get to start, read its lists and exit.
LOCK_WAIT_SLACK_SECONDS = 15
APT_STEP_TIMEOUT_SECONDS = 90

PYENV_PYTHON_3_9 = "/root/.pyenv/versions/3.9.18/bin/python3.9"
PYENV_PYTHON_3_11 = "/root/.pyenv/versions/3.11.7/bin/python3.11"
PYENV_SITE_PACKAGES_3_9 = "/root/.pyenv/versions/3.9.18/lib/python3.9/site-packages"
PYENV_SITE_PACKAGES_3_11 = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages"
SYSTEM_PYTHON = "/usr/bin/python3"

# A child process that takes the dpkg frontend lock the way apt does
# (fcntl F_SETLK, write lock on the whole file), reports it, and holds it
# until its stdin is closed.
LOCK_HOLDER_SCRIPT = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    sys.stdin.read()
    """
)

APT_TOOLS = ("apt-get", "dpkg", "dpkg-deb", "dpkg-query")


def _apt_skip_reason() -> Optional[str]:
    """Return why the apt tests cannot run here, or None when they can."""

    if os.geteuid() != 0:
        return "installing real packages needs root"
    missing = [tool for tool in APT_TOOLS if shutil.which(tool, path=MINIMAL_PATH) is None]
    if missing:
        return f"installing real packages needs {', '.join(missing)}, which is not on {MINIMAL_PATH}"
    return None


apt_skip_reason = _apt_skip_reason()
needs_apt_as_root = pytest.mark.skipif(apt_skip_reason is not None, reason=apt_skip_reason or "")


def _network_env(path: Optional[str] = None) -> Dict[str, str]:
    extra = {name: os.environ[name] for name in NETWORK_VARIABLES if name in os.environ}
    if path is not None:
        extra["PATH"] = path
    return minimal_environment(extra, None)


def _install(dependencies: dict, device_root: Path, env: Optional[Dict[str, str]] = None, **options):
    return install_dependencies(
        Dependencies.model_validate(dependencies),
        device_root=str(device_root),
        env=env if env is not None else _network_env(),
        **options,
    )


def _apt(name: str, version: Optional[str] = None) -> dict:
    package = {"name": name} if version is None else {"name": name, "version": version}
    return {"apt": {"timeout_seconds": APT_STEP_TIMEOUT_SECONDS, "packages": [package]}}


def _run(argv, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"},
    )


def _installed_status(package: str) -> Optional[str]:
    """Return dpkg's status word of a package (installed, half-configured, ...), or None when dpkg does not list it."""

    query = _run(["dpkg-query", "-W", "-f", "${Status}", package], check=False)
    if query.returncode != 0 or not query.stdout.strip():
        return None
    return query.stdout.split()[-1]


def _installed_version(package: str) -> str:
    return _run(["dpkg-query", "-W", "-f", "${Version}", package]).stdout


def _purge_test_packages() -> None:
    for package in TEST_PACKAGES:
        if _installed_status(package) not in (None, "not-installed"):
            _run(["dpkg", "--purge", "--force-all", package], check=False)


def _build_package(work_dir: Path, name: str, version: str, files=None, postinst: Optional[str] = None) -> Path:
    """Build `name_version_all.deb` with dpkg-deb.

    `files` maps absolute paths to contents, and files under /etc become conffiles.
    """

    root = work_dir / f"{name}-{version}"
    control_dir = root / "DEBIAN"
    control_dir.mkdir(parents=True)
    control_dir.joinpath("control").write_text(
        f"Package: {name}\n"
        f"Version: {version}\n"
        "Architecture: all\n"
        "Maintainer: microupdates tests <tests@example.invalid>\n"
        "Description: package built by the microupdates agent tests\n"
    )

    files = files or {}
    for path, content in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    conffiles = [path for path in files if path.startswith("/etc/")]
    if conffiles:
        control_dir.joinpath("conffiles").write_text("".join(f"{path}\n" for path in conffiles))

    if postinst is not None:
        script = control_dir / "postinst"
        script.write_text(postinst)
        script.chmod(0o755)

    deb = work_dir / f"{name}_{version}_all.deb"
    _run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)])
    return deb


def _packages_stanza(deb: Path, name: str, version: str) -> str:
    """Return the Packages index entry of a .deb, with the fields and checksums apt checks."""

    data = deb.read_bytes()
    return (
        f"Package: {name}\n"
        f"Version: {version}\n"
        "Architecture: all\n"
        "Maintainer: microupdates tests <tests@example.invalid>\n"
        f"Filename: ./{deb.name}\n"
        f"Size: {len(data)}\n"
        f"MD5sum: {hashlib.md5(data).hexdigest()}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        "Description: package built by the microupdates agent tests\n"
    )


# apt names a downloaded list after its URI, with these characters written as
# %xx (lowercase hex) and then "/" replaced by "_" (URItoFileName in apt-pkg).
_APT_LIST_NAME_ESCAPED = '\\|{}[]<>"^~_=!@#$%&*'


def _downloaded_lists(repository: str) -> list:
    """Return the files apt-get update stored in /var/lib/apt/lists for the repository."""

    escaped = "".join(f"%{ord(char):02x}" if char in _APT_LIST_NAME_ESCAPED else char for char in repository)
    return glob.glob("/var/lib/apt/lists/" + glob.escape(escaped.replace("/", "_")) + "_*")


def _update_test_list_only() -> None:
    _run(
        [
            "apt-get",
            "update",
            "-o",
            f"Dir::Etc::sourcelist={TEST_LIST_FILE}",
            "-o",
            "Dir::Etc::sourceparts=-",
            "-o",
            "APT::Get::List-Cleanup=0",
        ]
    )


@pytest.fixture(scope="module")
def local_repository():
    """Serve the conffile package (versions 1.0 and 2.0) and a small package from a local trusted apt source."""

    if os.path.exists(TEST_LIST_FILE):
        pytest.skip(f"{TEST_LIST_FILE} already exists, so another test run may be using it")

    # The directory is world-readable because apt reads file: sources as its
    # unprivileged _apt user.
    repository = tempfile.mkdtemp(prefix="microupdates-test-repo-", dir="/var/tmp")
    os.chmod(repository, 0o755)
    try:
        stanzas = []
        for version, content in (("1.0", "setting = 1\n"), ("2.0", "setting = 2\n")):
            deb = _build_package(Path(repository), CONFFILE_PACKAGE, version, files={CONFFILE: content})
            stanzas.append(_packages_stanza(deb, CONFFILE_PACKAGE, version))
        deb = _build_package(Path(repository), SMALL_PACKAGE, "1.0")
        stanzas.append(_packages_stanza(deb, SMALL_PACKAGE, "1.0"))
        Path(repository, "Packages").write_text("\n".join(stanzas))

        Path(TEST_LIST_FILE).write_text(f"deb [trusted=yes] file:{repository} ./\n")
        _update_test_list_only()
        assert _downloaded_lists(repository), "apt-get update stored no list under the expected name"
        yield repository
    finally:
        _purge_test_packages()
        if os.path.exists(TEST_LIST_FILE):
            os.remove(TEST_LIST_FILE)
        for path in _downloaded_lists(repository):
            os.remove(path)
        shutil.rmtree(repository, ignore_errors=True)
        shutil.rmtree("/etc/microupdates-test", ignore_errors=True)


@pytest.fixture
def half_configured_package(tmp_path):
    """Leave a package half-configured, the way a failed or crashed install does, and purge it afterwards."""

    postinst = "#!/bin/sh\necho 'postinst fails on purpose' >&2\nexit 1\n"
    deb = _build_package(tmp_path, BROKEN_PACKAGE, "1.0", postinst=postinst)
    try:
        installed = _run(["dpkg", "-i", str(deb)], check=False)
        assert installed.returncode != 0, installed.stdout
        assert _installed_status(BROKEN_PACKAGE) == "half-configured"
        yield BROKEN_PACKAGE
    finally:
        _run(["dpkg", "--purge", "--force-all", BROKEN_PACKAGE], check=False)


class _LockHolder:
    """A child process holding a write lock on a file until stop() closes its stdin."""

    def __init__(self, path: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER_SCRIPT, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self.process.stdout.readline()
        if ready != "locked\n":
            self.stop()
            raise AssertionError(f"the lock holder could not lock {path}, perhaps because apt or dpkg is running")
        self.pid = self.process.pid
        self.command = read_process_name(self.pid)

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def held_dpkg_lock():
    holder = _LockHolder(DPKG_FRONTEND_LOCK)
    try:
        yield holder
    finally:
        holder.stop()


def test_find_lock_holder_names_process(tmp_path):
    lock_file = tmp_path / "lock"
    lock_file.write_text("")
    holder = _LockHolder(str(lock_file))
    try:
        found = find_lock_holder([str(lock_file)])
    finally:
        holder.stop()

    assert found is not None
    assert found.path == str(lock_file)
    assert found.pid == holder.pid
    assert found.command == holder.command
    assert find_lock_holder([str(lock_file)]) is None


def test_apt_lock_failure_from_old_apt_message():
    # apt before 1.9 fails at once with this message and names no holder.
    output = (
        "E: Could not get lock /var/lib/dpkg/lock-frontend - open (11: Resource temporarily unavailable)\n"
        "E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend), is another process using it?\n"
    )

    error = describe_apt_lock_failure(output, 120)

    assert error is not None
    assert error.startswith("the dpkg lock /var/lib/dpkg/lock-frontend is held by ")
    assert error.endswith(", and apt-get gave up after waiting 120 s for it; retry when that process has finished")


@needs_apt_as_root
def test_apt_lock_held_names_holder(local_repository, held_dpkg_lock, tmp_path):
    started = time.monotonic()
    steps = _install(_apt(SMALL_PACKAGE), tmp_path, apt_lock_timeout_seconds=LOCK_WAIT_SECONDS)
    elapsed = time.monotonic() - started

    assert [step.name for step in steps] == ["apt-get install"]
    assert steps[0].exit_code == 100
    assert steps[0].error == (
        f"the dpkg lock {DPKG_FRONTEND_LOCK} is held by process {held_dpkg_lock.pid} ({held_dpkg_lock.command}), "
        f"and apt-get gave up after waiting {LOCK_WAIT_SECONDS} s for it; retry when that process has finished"
    )
    assert elapsed >= LOCK_WAIT_SECONDS
    assert elapsed < LOCK_WAIT_SECONDS + LOCK_WAIT_SLACK_SECONDS
    assert _installed_status(SMALL_PACKAGE) is None


@needs_apt_as_root
def test_apt_timeout_while_waiting_names_holder(local_repository, held_dpkg_lock, tmp_path):
    dependencies = {"apt": {"timeout_seconds": 2, "packages": [{"name": SMALL_PACKAGE}]}}

    steps = _install(dependencies, tmp_path, apt_lock_timeout_seconds=60)

    assert steps[0].error == (
        f"timed out after 2 s while apt-get waited for the dpkg lock {DPKG_FRONTEND_LOCK}, "
        f"which is held by process {held_dpkg_lock.pid} ({held_dpkg_lock.command})"
    )


@needs_apt_as_root
def test_apt_upgrade_keeps_edited_conffile(local_repository, tmp_path):
    _purge_test_packages()
    first = _install(_apt(CONFFILE_PACKAGE, "1.0"), tmp_path)
    assert first[0].error is None, first[0].output
    Path(CONFFILE).write_text("setting = edited on the device\n")

    steps = _install(_apt(CONFFILE_PACKAGE, "2.0"), tmp_path)

    assert steps[0].error is None, steps[0].output
    # dpkg's conffile question, answered by --force-confdef --force-confold.
    assert "Keeping old config file as default." in steps[0].output
    assert _installed_version(CONFFILE_PACKAGE) == "2.0"
    assert Path(CONFFILE).read_text() == "setting = edited on the device\n"
    assert Path(CONFFILE + ".dpkg-dist").read_text() == "setting = 2\n"


@needs_apt_as_root
def test_apt_stops_on_half_configured_package(local_repository, half_configured_package, tmp_path):
    steps = _install(_apt(SMALL_PACKAGE), tmp_path)

    assert [step.name for step in steps] == ["apt-get install"]
    assert steps[0].exit_code is None
    assert steps[0].error == (
        f"dpkg reports packages left unfinished by an earlier failed or interrupted install ({BROKEN_PACKAGE}), "
        "so apt-get was not run: run `dpkg --configure -a` as root on the device "
        "(and fix or purge a package whose maintainer script keeps failing), then retry"
    )
    assert "half configured" in steps[0].output
    assert _installed_status(SMALL_PACKAGE) is None


@needs_apt_as_root
def test_apt_unfinished_while_locked_waits(local_repository, half_configured_package, held_dpkg_lock, tmp_path):
    # While another process holds the lock, unfinished packages may be its
    # install in progress, so apt-get waits for the lock instead.
    steps = _install(_apt(SMALL_PACKAGE), tmp_path, apt_lock_timeout_seconds=LOCK_WAIT_SECONDS)

    assert steps[0].exit_code == 100
    assert steps[0].error.startswith(f"the dpkg lock {DPKG_FRONTEND_LOCK} is held by process {held_dpkg_lock.pid}")


@needs_apt_as_root
def test_apt_unknown_package_suggests_update(tmp_path):
    steps = _install(_apt("microupdates-no-such-package"), tmp_path)

    assert [step.name for step in steps] == ["apt-get install"]
    assert steps[0].exit_code == 100
    assert steps[0].error == (
        "apt-get found no package microupdates-no-such-package in its package lists, which may be stale: "
        "check the name and version, then run `apt-get update` on the device "
        "(or add the repository that provides the package) and retry"
    )


@needs_apt_as_root
def test_apt_unknown_version_suggests_update(local_repository, tmp_path):
    steps = _install(_apt(CONFFILE_PACKAGE, "9.9"), tmp_path)

    assert steps[0].exit_code == 100
    assert steps[0].error.startswith(
        f"apt-get found no version 9.9 of package {CONFFILE_PACKAGE} in its package lists, which may be stale"
    )


def _system_python_marker() -> Optional[Path]:
    """Return the PEP 668 marker of Debian's python3 when it is there and that python3 has pip, else None."""

    if not os.path.exists(SYSTEM_PYTHON):
        return None
    stdlib = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    has_pip = subprocess.run([SYSTEM_PYTHON, "-m", "pip", "--version"], capture_output=True, timeout=60)
    marker = Path(stdlib.stdout.strip(), "EXTERNALLY-MANAGED")
    if stdlib.returncode != 0 or has_pip.returncode != 0 or not marker.exists():
        return None
    return marker


system_python_marker = _system_python_marker()


@pytest.mark.skipif(
    system_python_marker is None,
    reason=f"{SYSTEM_PYTHON} has no EXTERNALLY-MANAGED marker or no pip, and pip ignores a marker inside a virtualenv",
)
def test_pip_externally_managed_points_to_virtualenv(tmp_path):
    marker_content = system_python_marker.read_bytes()
    # No such package exists, so nothing is installed even if pip ignored the marker.
    dependencies = {"pip3": {"packages": [{"name": "microupdates-test-no-such-package"}]}}

    steps = _install(dependencies, tmp_path, env=_network_env(path="/usr/bin:/bin"))

    assert [step.name for step in steps] == ["pip3 install"]
    assert steps[0].error == (
        f"pip refused to install into {SYSTEM_PYTHON} because the distribution marks it as externally managed "
        "(PEP 668); set dependencies.pip3.virtualenv in the recipe"
    )
    assert "externally-managed-environment" in steps[0].output
    assert system_python_marker.exists()
    assert system_python_marker.read_bytes() == marker_content


def _python_version(interpreter: str) -> str:
    version = subprocess.run([interpreter, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return version.stdout.strip()


@pytest.mark.skipif(
    not (os.path.exists(PYENV_PYTHON_3_9) and os.path.exists(PYENV_PYTHON_3_11)),
    reason=f"needs two different interpreters, {PYENV_PYTHON_3_9} and {PYENV_PYTHON_3_11}",
)
def test_pip_and_pip3_report_their_interpreters(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(PYENV_PYTHON_3_9)
    (bin_dir / "python3").symlink_to(PYENV_PYTHON_3_11)
    env = _network_env(path=f"{bin_dir}:{MINIMAL_PATH}")
    # pip is already installed in both, so pip only reports where it is.
    dependencies = {"pip": {"packages": [{"name": "pip"}]}, "pip3": {"packages": [{"name": "pip"}]}}

    steps = _install(dependencies, tmp_path, env=env)

    expected = {
        "pip install": (bin_dir / "python", PYENV_PYTHON_3_9, PYENV_SITE_PACKAGES_3_9),
        "pip3 install": (bin_dir / "python3", PYENV_PYTHON_3_11, PYENV_SITE_PACKAGES_3_11),
    }
    assert [step.name for step in steps] == list(expected)
    for step in steps:
        link, target, site_packages = expected[step.name]
        description = f"{link} -> {os.path.realpath(target)} ({_python_version(target)})"
        assert step.error is None, step.output
        assert step.interpreter == description
        assert step.output.startswith(f"interpreter: {description}\n")
        assert f"Requirement already satisfied: pip in {site_packages}" in step.output


npm_path = shutil.which("npm", path=MINIMAL_PATH)


@pytest.mark.skipif(npm_path is None, reason="npm is not on the minimal PATH")
def test_npm_failure_names_project_directory(tmp_path):
    project = tmp_path / "srv/web"
    project.mkdir(parents=True)
    # An invalid package.json makes npm fail before it contacts the registry.
    (project / "package.json").write_text("{not json\n")
    dependencies = {"npm": {"directory": "/srv/web", "packages": [{"name": "is-number", "version": "7.0.0"}]}}

    steps = _install(dependencies, tmp_path)

    assert [step.name for step in steps] == ["npm install"]
    assert steps[0].exit_code == 1
    assert steps[0].error == f"exited with status 1 in npm project directory {project}"
    assert "EJSONPARSE" in steps[0].output


def test_npm_missing_names_path(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    dependencies = {"npm": {"directory": "/srv/web", "packages": [{"name": "is-number"}]}}

    steps = _install(dependencies, tmp_path, env=_network_env(path=str(empty_bin)))

    assert [step.name for step in steps] == ["npm install"]
    assert steps[0].error == f"'npm' was not found on PATH {empty_bin}"
