"""Field failures reproduced through the whole system: each ends in a clear error and a rollback, never a hang."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
import time

import pytest

from tests.stack_helpers import wait_for_deployment, write_recipe

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (dpkg lock, mount)")
DPKG_FRONTEND_LOCK = "/var/lib/dpkg/lock-frontend"


def start_device(api, fleet, name: str):
    device = fleet.add(name, api.register_device(name, groups=[name])["token"])
    fleet.start(device)
    return device


@requires_root
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not installed")
def test_held_dpkg_lock_fails_naming_holder(api, fleet, tmp_path, unique_name):
    name = f"dpkglock-{unique_name}"
    start_device(api, fleet, name)
    recipe = {
        "version": "1.0.0",
        "targets": {"devices": [name]},
        "dependencies": {"apt": {"packages": [{"name": "hello"}], "lock_timeout_seconds": 3}},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    with open(DPKG_FRONTEND_LOCK, "w") as lock_file:
        fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        detail = wait_for_deployment(api, api.deploy(update["id"])["id"], timeout=120)

    row = detail["devices"][0]
    assert row["stage"] == "dependencies"
    assert row["status"] == "rolled_back", row
    assert f"is held by process {os.getpid()}" in row["error"]
    assert "waiting 3 s" in row["error"]


@pytest.mark.skipif(not glob.glob("/usr/lib/python3*/EXTERNALLY-MANAGED"),
                    reason="this system's python3 is not marked externally managed (PEP 668)")
def test_pip_into_externally_managed_python_points_to_virtualenv(api, fleet, tmp_path, unique_name):
    name = f"pep668-{unique_name}"
    start_device(api, fleet, name)
    recipe = {
        "version": "1.0.0",
        "targets": {"devices": [name]},
        "dependencies": {"pip3": {"packages": [{"name": "six", "version": "1.16.0"}]}},
    }
    update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe))

    detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

    row = detail["devices"][0]
    assert row["status"] == "rolled_back", row
    assert "externally managed (PEP 668)" in row["error"]
    assert "set dependencies.pip3.virtualenv in the recipe" in row["error"]
    assert glob.glob("/usr/lib/python3*/EXTERNALLY-MANAGED"), "the marker is never removed"


def test_replacing_running_executable_keeps_old_process(api, fleet, tmp_path, unique_name):
    name = f"running-{unique_name}"
    device = fleet.add(name, api.register_device(name, groups=[name])["token"])
    executable = device.root / "opt/bin/worker"
    executable.parent.mkdir(parents=True)
    shutil.copy2("/bin/sleep", executable)
    running = subprocess.Popen([str(executable), "300"])
    fleet.start(device)
    try:
        recipe = {
            "version": "1.0.0",
            "targets": {"devices": [name]},
            "files": [{"source": "worker", "destination": "/opt/bin/worker", "mode": "0755"}],
        }
        update = api.create_update_from_file(
            write_recipe(tmp_path / "recipe", recipe, {"worker": b"#!/bin/sh\necho new worker\n"})
        )

        detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

        assert detail["status"] == "succeeded", detail
        assert running.poll() is None, "the running program keeps its old executable"
        assert os.readlink(f"/proc/{running.pid}/exe").endswith("(deleted)")
        assert subprocess.run([str(executable)], capture_output=True, text=True).stdout == "new worker\n"
    finally:
        running.kill()
        running.wait()


@requires_root
def test_full_disk_fails_files_stage_and_rolls_back(api, fleet, tmp_path, unique_name):
    name = f"fulldisk-{unique_name}"
    device = fleet.add(name, api.register_device(name, groups=[name])["token"])
    small = device.root / "opt/small"
    small.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        (small / "kept.txt").write_text("kept\n")
        fleet.start(device)
        recipe = {
            "version": "1.0.0",
            "targets": {"devices": [name]},
            "files": [
                {"source": "small.txt", "destination": "/opt/small/kept.txt"},
                {"source": "big.bin", "destination": "/opt/small/big.bin"},
            ],
        }
        files = {"small.txt": b"replaced\n", "big.bin": os.urandom(1024 * 1024)}
        update = api.create_update_from_file(write_recipe(tmp_path / "recipe", recipe, files))

        detail = wait_for_deployment(api, api.deploy(update["id"])["id"])

        row = detail["devices"][0]
        assert row["stage"] == "files"
        assert row["status"] == "rolled_back", row
        assert "not enough free space on the filesystem of" in row["error"]
        assert sorted(path.name for path in small.iterdir()) == ["kept.txt"]
        assert (small / "kept.txt").read_text() == "kept\n"
    finally:
        fleet.stop(device)
        for _ in range(20):
            if subprocess.run(["umount", str(small)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
