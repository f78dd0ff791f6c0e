"""The files stage on a full file system: a 1 MiB tmpfs mounted inside the device root.

Mounting needs root and permission to mount, so these tests are skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from microupdates.device_agent.executors import files as files_module
from microupdates.device_agent.stages import StageContext, run_stage
from microupdates.protocol.device_api import StageJob
from microupdates.protocol.recipe import FileEntry
from tests.agent.artifacts import ArtifactStore, file_member, tar_bytes

DEPLOYMENT_ID = "dep-space"
MIB = 1024 * 1024


def _job(stage: str, files=()) -> StageJob:
    return StageJob(
        job_id=1,
        deployment_id=DEPLOYMENT_ID,
        device_id="dev-1",
        update_version="2.0.0",
        stage=stage,
        progress_interval_seconds=10,
        files=list(files),
    )


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def root(tmp_path):
    device_root = tmp_path / "device"
    device_root.mkdir()
    return device_root


@pytest.fixture
def small_filesystem(root):
    """Mount a 1 MiB tmpfs at <root>/opt and unmount it afterwards."""

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = root / "opt"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


def _context(root: Path, state: Path, store: ArtifactStore) -> StageContext:
    return StageContext(device_root=str(root), open_artifact=store.open, state_dir=str(state))


def _available_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _leftovers(directory: Path):
    return [name for name in os.listdir(directory) if name.startswith(".microupdates-")]


def test_files_stage_rejects_file_larger_than_free_space(small_filesystem, root, tmp_path, store):
    entry = FileEntry(source="big", destination="/opt/app/big.bin", artifact=store.add(b"x" * (2 * MIB)))
    available = _available_bytes(small_filesystem)

    report = run_stage(_job("files", [entry]), _context(root, tmp_path / "state", store))

    assert report.status == "failed"
    assert [step.name for step in report.steps] == ["check free space"]
    assert report.steps[0].error == (
        f"not enough free space on the filesystem of /opt/app/big.bin: {2 * MIB} bytes needed, {available} available"
    )
    assert os.listdir(small_filesystem) == []


def test_files_stage_counts_archive_content(small_filesystem, root, tmp_path, store):
    # Zeros compress to a few kilobytes, so only the extracted size shows the shortage.
    archive = tar_bytes([(file_member("a.bin"), b"\0" * (600 * 1024)), (file_member("b.bin"), b"\0" * (600 * 1024))])
    entry = FileEntry(source="d", destination="/opt/data", kind="directory", artifact=store.add(archive))

    report = run_stage(_job("files", [entry]), _context(root, tmp_path / "state", store))

    assert len(archive) < 100 * 1024
    assert report.status == "failed"
    expected = "not enough free space on the filesystem of /opt/data: 1228800 bytes needed"
    assert report.steps[0].error.startswith(expected)
    assert os.listdir(small_filesystem) == []


def test_files_stage_counts_backup_copy_on_other_filesystem(small_filesystem, root, store):
    # The state directory is on the tmpfs and the destination is not, so the
    # backup of the replaced file must be a copy on the tmpfs.
    existing = root / "etc/app.bin"
    existing.parent.mkdir()
    existing.write_bytes(b"o" * (1536 * 1024))
    entry = FileEntry(source="a", destination="/etc/app.bin", artifact=store.add(b"n" * 1024))
    state = small_filesystem / "state"
    backup_directory = state / "changes" / DEPLOYMENT_ID / "backup"
    available = _available_bytes(small_filesystem)

    report = run_stage(_job("files", [entry]), _context(root, state, store))

    assert report.status == "failed"
    assert report.steps[0].error == (
        f"not enough free space on the filesystem of {backup_directory}: "
        f"{1536 * 1024} bytes needed, {available} available"
    )
    assert existing.read_bytes() == b"o" * (1536 * 1024)


def test_files_stage_needs_room_beside_existing_file(small_filesystem, root, tmp_path, store):
    # The old file stays until the new one is renamed over it, so both need room.
    existing = small_filesystem / "app.bin"
    existing.write_bytes(b"o" * (600 * 1024))
    entry = FileEntry(source="a", destination="/opt/app.bin", artifact=store.add(b"n" * (600 * 1024)))
    available = _available_bytes(small_filesystem)

    report = run_stage(_job("files", [entry]), _context(root, tmp_path / "state", store))

    assert report.status == "failed"
    assert report.steps[0].error == (
        f"not enough free space on the filesystem of /opt/app.bin: {600 * 1024} bytes needed, {available} available"
    )
    assert existing.read_bytes() == b"o" * (600 * 1024)


def test_files_stage_out_of_space_mid_write_reverts(small_filesystem, root, tmp_path, store, monkeypatch):
    original = small_filesystem / "a.txt"
    original.write_bytes(b"original\n")
    original.chmod(0o600)
    entries = [
        FileEntry(source="a", destination="/opt/a.txt", artifact=store.add(b"a" * (100 * 1024))),
        FileEntry(source="b", destination="/opt/b.bin", artifact=store.add(b"b" * (2 * MIB))),
    ]
    # The space check would stop the stage before writing, so it is skipped to
    # reach the write that fails with ENOSPC.
    monkeypatch.setattr(files_module, "find_space_shortage", lambda entries, backup_directory: None)
    state = tmp_path / "state"

    update = run_stage(_job("files", entries), _context(root, state, store))

    assert update.status == "failed"
    assert update.error == "file /opt/b.bin: no space left on the filesystem of /opt/b.bin while writing it"
    assert original.read_bytes() == b"a" * (100 * 1024)
    assert _leftovers(small_filesystem) == []
    assert not (small_filesystem / "b.bin").exists()

    revert = run_stage(_job("revert_files"), _context(root, state, store))

    assert revert.status == "succeeded", revert.error
    assert original.read_bytes() == b"original\n"
    assert oct(original.stat().st_mode & 0o7777) == oct(0o600)
    assert sorted(os.listdir(small_filesystem)) == ["a.txt"]


def test_replace_directory_on_other_filesystem_than_state(small_filesystem, root, tmp_path, store):
    app = small_filesystem / "app"
    app.mkdir()
    (app / "old.txt").write_bytes(b"old\n")
    archive = tar_bytes([(file_member("new.txt"), b"new\n")])
    entry = FileEntry(source="a", destination="/opt/app", kind="directory", replace=True, artifact=store.add(archive))
    state = tmp_path / "state"

    update = run_stage(_job("files", [entry]), _context(root, state, store))

    assert update.status == "succeeded", update.error
    assert os.listdir(app) == ["new.txt"]
    # The old directory cannot be renamed into the state directory on the
    # other file system, so it waits beside the destination.
    assert len(_leftovers(small_filesystem)) == 1

    revert = run_stage(_job("revert_files"), _context(root, state, store))

    assert revert.status == "succeeded", revert.error
    assert os.listdir(app) == ["old.txt"]
    assert _leftovers(small_filesystem) == []
    shutil.rmtree(state)
