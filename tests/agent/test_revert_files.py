"""The files stage's change log and the revert_files compensation, on real files under a device root."""

from __future__ import annotations

import os
import signal
import stat
import threading
from pathlib import Path
from typing import Dict, Tuple

import pytest

from microupdates.device_agent.change_log import ChangeLog
from microupdates.device_agent.executors import files as files_module
from microupdates.device_agent.executors import revert_files as revert_module
from microupdates.device_agent.stages import StageContext, run_stage
from microupdates.protocol.device_api import StageJob
from microupdates.protocol.recipe import FileEntry
from tests.agent.artifacts import ArtifactStore, dir_member, file_member, link_member, tar_bytes

DEPLOYMENT_ID = "dep-revert"
IS_ROOT = os.geteuid() == 0


def snapshot(root: Path) -> Dict[str, Tuple]:
    """Return every path below root with its kind, mode, owner and content, link target or file mtime.

    Directory timestamps are left out, because adding and removing entries changes them.
    """

    result = {}
    for current, directory_names, file_names in os.walk(root):
        for name in directory_names + file_names:
            path = os.path.join(current, name)
            status = os.lstat(path)
            relative = os.path.relpath(path, root)
            owner = (status.st_uid, status.st_gid)
            mode = stat.S_IMODE(status.st_mode)
            if stat.S_ISLNK(status.st_mode):
                result[relative] = ("symlink", owner, os.readlink(path))
            elif stat.S_ISDIR(status.st_mode):
                result[relative] = ("directory", mode, owner)
            else:
                with open(path, "rb") as reader:
                    content = reader.read()
                result[relative] = ("file", mode, owner, content, status.st_mtime_ns)
    return result


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


def _context(root: Path, state: Path, store: ArtifactStore, **fields) -> StageContext:
    """Build a context the way a freshly started agent would, sharing only root and state directory."""

    return StageContext(device_root=str(root), open_artifact=store.open, state_dir=str(state), **fields)


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def root(tmp_path):
    device_root = tmp_path / "device"
    device_root.mkdir()
    return device_root


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def _prepare_device(root: Path) -> None:
    """Create the files, links and directories that the update in _update_entries overwrites."""

    (root / "etc").mkdir()
    config = root / "etc/app.conf"
    config.write_bytes(b"old = 1\n")
    config.chmod(0o640)
    os.utime(config, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))

    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").symlink_to("tool-1.0")
    (root / "usr/bin/tool-1.0").write_bytes(b"#!/bin/sh\necho 1.0\n")
    (root / "usr/bin/tool-1.0").chmod(0o755)

    app = root / "opt/app"
    (app / "lib").mkdir(parents=True)
    (app / "lib/old.py").write_bytes(b"old module\n")
    (app / "run.sh").write_bytes(b"#!/bin/sh\n")
    (app / "run.sh").chmod(0o4750)
    app.chmod(0o750)

    data = root / "srv/data"
    data.mkdir(parents=True)
    (data / "x.txt").write_bytes(b"old x\n")
    (data / "keep.txt").write_bytes(b"keep\n")

    if IS_ROOT:
        os.chown(config, 1234, 2345)
        os.lchown(root / "usr/bin/tool", 1234, 2345)
        os.chown(app, 4321, 5432)
        os.chown(app / "run.sh", 4321, 5432)
        # chown clears setuid, so the mode is set again afterwards.
        (app / "run.sh").chmod(0o4750)


def _update_entries(store: ArtifactStore):
    new_app = tar_bytes(
        [
            (file_member("server.py", 0o755), b"new server\n"),
            (dir_member("static", 0o700), None),
            (file_member("static/index.html"), b"<html>\n"),
            (link_member("current", "static"), None),
        ]
    )
    data_merge = tar_bytes(
        [
            (file_member("x.txt", 0o600), b"new x\n"),
            (file_member("sub/new.txt"), b"new file\n"),
            (link_member("latest", "sub/new.txt"), None),
        ]
    )
    return [
        FileEntry(source="c", destination="/etc/app.conf", artifact=store.add(b"new = 2\n")),
        FileEntry(source="t", destination="/usr/bin/tool", artifact=store.add(b"#!/bin/sh\necho 2.0\n"), mode="0755"),
        FileEntry(source="n", destination="/var/lib/app/deep/state.txt", artifact=store.add(b"state\n")),
        FileEntry(source="a", destination="/opt/app", kind="directory", replace=True, artifact=store.add(new_app)),
        FileEntry(source="d", destination="/srv/data", kind="directory", mode="0700", artifact=store.add(data_merge)),
    ]


def test_revert_files_restores_device_exactly(root, state, store):
    _prepare_device(root)
    before = snapshot(root)
    entries = _update_entries(store)

    update = run_stage(_job("files", entries), _context(root, state, store))

    assert update.status == "succeeded", update.error
    assert (root / "etc/app.conf").read_bytes() == b"new = 2\n"
    assert not (root / "usr/bin/tool").is_symlink()
    assert (root / "opt/app/server.py").read_bytes() == b"new server\n"
    assert not (root / "opt/app/lib").exists()
    assert os.readlink(root / "opt/app/current") == "static"
    assert stat.S_IMODE((root / "opt/app").stat().st_mode) == 0o750
    assert (root / "srv/data/x.txt").read_bytes() == b"new x\n"
    assert stat.S_IMODE((root / "srv/data").stat().st_mode) == 0o700
    if IS_ROOT:
        assert ((root / "opt/app").stat().st_uid, (root / "opt/app").stat().st_gid) == (4321, 5432)

    revert = run_stage(_job("revert_files"), _context(root, state, store))

    assert revert.status == "succeeded", revert.error
    assert snapshot(root) == before
    assert not (root / "var").exists()
    assert f"removed {root / 'var/lib/app/deep/state.txt'}" in revert.steps[0].output
    assert f"removed directory {root / 'var'}" in revert.steps[0].output
    assert os.listdir(ChangeLog(str(state), DEPLOYMENT_ID).backup_directory) == []


@pytest.mark.skipif(not IS_ROOT, reason="changing a file's owner to another user needs root")
def test_revert_files_restores_owner(root, state, store):
    _prepare_device(root)
    entries = _update_entries(store)

    run_stage(_job("files", entries), _context(root, state, store))
    run_stage(_job("revert_files"), _context(root, state, store))

    config = (root / "etc/app.conf").stat()
    assert (config.st_uid, config.st_gid) == (1234, 2345)
    link = os.lstat(root / "usr/bin/tool")
    assert (link.st_uid, link.st_gid) == (1234, 2345)
    assert stat.S_IMODE((root / "opt/app/run.sh").stat().st_mode) == 0o4750


def test_revert_files_second_run_does_nothing(root, state, store):
    _prepare_device(root)
    before = snapshot(root)
    run_stage(_job("files", _update_entries(store)), _context(root, state, store))
    first = run_stage(_job("revert_files"), _context(root, state, store))

    second = run_stage(_job("revert_files"), _context(root, state, store))

    assert first.status == "succeeded"
    assert second.status == "succeeded"
    assert [step.output for step in second.steps] == ["nothing to revert\n"]
    assert snapshot(root) == before


def test_revert_files_without_records_succeeds(root, state, store):
    report = run_stage(_job("revert_files"), _context(root, state, store))

    assert report.status == "succeeded"
    assert report.steps[0].output == "nothing to revert\n"


def test_revert_files_keeps_non_empty_created_directory(root, state, store):
    entry = FileEntry(source="s", destination="/var/app/new.txt", artifact=store.add(b"new\n"))
    run_stage(_job("files", [entry]), _context(root, state, store))
    (root / "var/app/written-later.log").write_bytes(b"log\n")

    report = run_stage(_job("revert_files"), _context(root, state, store))

    assert report.status == "succeeded"
    assert not (root / "var/app/new.txt").exists()
    assert (root / "var/app/written-later.log").read_bytes() == b"log\n"
    assert f"kept {root / 'var/app'}: the update created this directory, but it is not empty" in report.steps[0].output


def test_revert_files_resumes_after_interrupted_revert(root, state, store, monkeypatch):
    _prepare_device(root)
    before = snapshot(root)
    run_stage(_job("files", _update_entries(store)), _context(root, state, store))

    original = revert_module._revert_record
    calls = []

    def crash_after_three(record):
        if len(calls) == 3:
            raise SystemExit("simulated crash of the agent")
        calls.append(record.path)
        return original(record)

    monkeypatch.setattr(revert_module, "_revert_record", crash_after_three)
    with pytest.raises(SystemExit):
        revert_module.revert_files(ChangeLog(str(state), DEPLOYMENT_ID))
    monkeypatch.setattr(revert_module, "_revert_record", original)

    report = run_stage(_job("revert_files"), _context(root, state, store))

    assert len(calls) == 3
    assert report.status == "succeeded", report.error
    assert snapshot(root) == before


def _install_in_killed_child(entries, root: Path, state: Path, store: ArtifactStore, kill_before_move) -> None:
    """Run install_files in a forked child that SIGKILLs itself before a chosen rename, as a crash would end it.

    kill_before_move(source) is asked before each os.rename and os.replace
    of the files stage. No finally block or cleanup of the child runs, so
    whatever it left on disk stays.
    """

    pid = os.fork()
    if pid == 0:
        try:
            real_rename, real_replace = os.rename, os.replace

            def checked(move):
                def move_or_die(source, target):
                    if kill_before_move(str(source)):
                        os.kill(os.getpid(), signal.SIGKILL)
                    move(source, target)

                return move_or_die

            files_module.os.rename = checked(real_rename)
            files_module.os.replace = checked(real_replace)
            files_module.install_files(
                entries,
                device_root=str(root),
                open_artifact=store.open,
                change_log=ChangeLog(str(state), DEPLOYMENT_ID),
            )
        finally:
            os._exit(1)

    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL


def test_revert_files_after_crash_between_directory_renames(root, state, store):
    _prepare_device(root)
    before = snapshot(root)
    entries = [entry for entry in _update_entries(store) if entry.destination == "/opt/app"]

    _install_in_killed_child(entries, root, state, store, lambda source: source.endswith("-stage"))

    assert not (root / "opt/app").exists()
    assert [name for name in os.listdir(root / "opt") if name.endswith("-stage")] != []

    report = run_stage(_job("revert_files"), _context(root, state, store))

    assert report.status == "succeeded", report.error
    assert snapshot(root) == before


def test_revert_files_after_crash_during_merge(root, state, store):
    _prepare_device(root)
    before = snapshot(root)
    entries = [entry for entry in _update_entries(store) if entry.destination == "/srv/data"]
    moves = []

    def second_move(source: str) -> bool:
        moves.append(source)
        return len(moves) == 2

    _install_in_killed_child(entries, root, state, store, second_move)

    assert [name for name in os.listdir(root / "srv") if name.endswith("-stage")] != []
    report = run_stage(_job("revert_files"), _context(root, state, store))

    assert report.status == "succeeded", report.error
    assert snapshot(root) == before


def test_revert_files_after_files_stage_failed(root, state, store):
    _prepare_device(root)
    before = snapshot(root)
    good = FileEntry(source="c", destination="/etc/app.conf", artifact=store.add(b"new = 2\n"))
    bad_digest = store.add(b"expected")
    Path(store.open(bad_digest)).write_bytes(b"tampered")
    bad = FileEntry(source="b", destination="/etc/other.conf", artifact=bad_digest)

    update = run_stage(_job("files", [good, bad]), _context(root, state, store))
    revert = run_stage(_job("revert_files"), _context(root, state, store))

    assert update.status == "failed"
    assert "SHA-256" in update.error
    assert revert.status == "succeeded", revert.error
    assert snapshot(root) == before


def test_revert_files_without_state_dir_fails(root, store):
    context = StageContext(device_root=str(root), open_artifact=store.open)

    report = run_stage(_job("revert_files"), context)

    assert report.status == "failed"
    assert "the agent has no state directory" in report.error


def test_files_stage_aborted_keeps_change_log(root, state, store, monkeypatch):
    _prepare_device(root)
    before = snapshot(root)
    abort = threading.Event()
    original = files_module._install_file

    def install_then_abort(*arguments):
        original(*arguments)
        abort.set()

    monkeypatch.setattr(files_module, "_install_file", install_then_abort)
    entries = _update_entries(store)[:3]

    update = run_stage(_job("files", entries), _context(root, state, store, abort_event=abort))
    revert = run_stage(_job("revert_files"), _context(root, state, store))

    assert update.status == "aborted"
    assert update.error == "aborted by the server during the files stage"
    assert [step.error for step in update.steps] == [None, "aborted"]
    assert revert.status == "succeeded", revert.error
    assert snapshot(root) == before


def test_files_stage_rejects_symlink_leaving_destination(root, state, store):
    archive = tar_bytes([(file_member("ok.txt"), b"ok"), (link_member("escape", "../../etc/passwd"), None)])
    entry = FileEntry(source="d", destination="/srv/app", kind="directory", artifact=store.add(archive))

    report = run_stage(_job("files", [entry]), _context(root, state, store))

    assert report.status == "failed"
    assert "'escape' is a symbolic link to '../../etc/passwd', outside the destination" in report.error
    assert not (root / "srv").exists()
