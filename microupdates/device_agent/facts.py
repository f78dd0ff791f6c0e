"""Facts about the device that decide whether an update can run on it, sent with each check-in."""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
from typing import Dict, List, Optional

from microupdates.protocol.device_api import DeviceFacts

logger = logging.getLogger(__name__)

# Bound on each probe (`INTERPRETER -m pip --version`, python3's version),
# which takes under a second on a typical device.
PROBE_TIMEOUT_SECONDS = 20
OS_RELEASE_PATH = "/etc/os-release"


def collect_facts(env: Dict[str, str], disk_path: str) -> DeviceFacts:
    """Probe the package managers on the PATH that stages run with, and read the device's details."""

    path = env.get("PATH", "")
    managers: List[str] = []
    if shutil.which("apt-get", path=path) and shutil.which("dpkg", path=path):
        managers.append("apt")
    for manager, interpreter in (("pip", "python"), ("pip3", "python3")):
        if _runs([interpreter, "-m", "pip", "--version"], env):
            managers.append(manager)
    if shutil.which("npm", path=path):
        managers.append("npm")
    python_version = _python3_version(env)
    if python_version is not None:
        managers.append("python3")

    return DeviceFacts(
        package_managers=managers,
        python_version=python_version,
        architecture=platform.machine() or None,
        os_id=read_os_id(OS_RELEASE_PATH),
        free_disk_bytes=_free_disk_bytes(disk_path),
    )


def _runs(argv: List[str], env: Dict[str, str]) -> bool:
    """Return whether argv is on the PATH and exits 0 within PROBE_TIMEOUT_SECONDS."""

    executable = shutil.which(argv[0], path=env.get("PATH", ""))
    if executable is None:
        return False
    try:
        completed = subprocess.run(
            [executable] + argv[1:], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=PROBE_TIMEOUT_SECONDS,
        )
    except (OSError, subprocess.SubprocessError) as error:
        logger.info("Probe %s failed: %s", " ".join(argv), error)
        return False
    return completed.returncode == 0


def _python3_version(env: Dict[str, str]) -> Optional[str]:
    executable = shutil.which("python3", path=env.get("PATH", ""))
    if executable is None:
        return None
    try:
        completed = subprocess.run(
            [executable, "-c", "import platform; print(platform.python_version())"], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            timeout=PROBE_TIMEOUT_SECONDS,
        )
    except (OSError, subprocess.SubprocessError) as error:
        logger.info("Probe of python3's version failed: %s", error)
        return None
    if completed.returncode != 0:
        return None
    return completed.stdout.decode("utf-8", errors="replace").strip()[:64] or None


def read_os_id(path: str) -> Optional[str]:
    """Return the ID field of an os-release file, or None when it has none."""

    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                if key == "ID":
                    return value.strip().strip("\"'")[:64] or None
    except OSError:
        return None
    return None


def _free_disk_bytes(path: str) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
