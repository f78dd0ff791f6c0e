from __future__ import annotations

import hashlib
import os
import threading

from microupdates.device_agent.change_log import ChangeLog
from microupdates.device_agent.stages import StageContext, run_stage
from microupdates.protocol.device_api import StageJob
from microupdates.protocol.recipe import CommandStage, Dependencies, FileEntry


def _job(stage: str, **fields) -> StageJob:
    return StageJob(
        job_id=7,
        deployment_id="dep-123",
        device_id="dev-1",
        update_version="1.2.3",
        stage=stage,
        progress_interval_seconds=10,
        **fields,
    )


def _context(tmp_path, **fields) -> StageContext:
    def no_artifacts(digest: str) -> str:
        raise AssertionError(f"unexpected artifact request {digest}")

    fields.setdefault("open_artifact", no_artifacts)
    return StageContext(device_root=str(tmp_path), **fields)


def test_run_stage_before_succeeds_with_environment(tmp_path):
    script = 'echo "$MICROUPDATES_DEPLOYMENT_ID $MICROUPDATES_STAGE $MICROUPDATES_UPDATE_VERSION $MY_SETTING"; pwd'
    job = _job("before", command=CommandStage(run=script))

    report = run_stage(job, _context(tmp_path, extra_env={"MY_SETTING": "on"}))

    assert report.status == "succeeded"
    assert report.error is None
    assert report.exit_code is None
    assert [step.name for step in report.steps] == ["before"]
    assert report.steps[0].output == f"dep-123 before 1.2.3 on\n{tmp_path}\n"
    assert report.duration_seconds > 0


def test_run_stage_after_failure_reports_exit_code(tmp_path):
    job = _job("after", command=CommandStage(run="echo checking; exit 4"))

    report = run_stage(job, _context(tmp_path))

    assert report.status == "failed"
    assert report.exit_code == 4
    assert report.error == "after: exited with status 4"
    assert report.steps[0].output == "checking\n"


def test_run_stage_command_timeout(tmp_path):
    job = _job("before", command=CommandStage(run="sleep 30", timeout_seconds=1))

    report = run_stage(job, _context(tmp_path))

    assert report.status == "failed"
    assert report.error == "before: timed out after 1 s"


def test_run_stage_command_without_run_text_fails(tmp_path):
    job = _job("before", command=CommandStage(script="stop.sh"))

    report = run_stage(job, _context(tmp_path))

    assert report.status == "failed"
    assert "did not resolve 'script' to 'run'" in report.error


def test_run_stage_command_missing_fails(tmp_path):
    report = run_stage(_job("after"), _context(tmp_path))

    assert report.status == "failed"
    assert report.error == "after: the after stage job has no command"


def test_run_stage_forwards_output(tmp_path):
    chunks = []
    job = _job("before", command=CommandStage(run="echo progress"))

    run_stage(job, _context(tmp_path, on_output=chunks.append))

    assert b"".join(chunks) == b"progress\n"


def test_run_stage_already_aborted_runs_nothing(tmp_path):
    abort = threading.Event()
    abort.set()
    marker = tmp_path / "ran"
    job = _job("before", command=CommandStage(run=f"touch {marker}"))

    report = run_stage(job, _context(tmp_path, abort_event=abort))

    assert report.status == "aborted"
    assert report.error == "aborted by the server during the before stage"
    assert not marker.exists()


def test_run_stage_files_installs_and_records_changes(tmp_path):
    content = b"config = 1\n"
    digest = hashlib.sha256(content).hexdigest()
    artifact = tmp_path / "artifact"
    artifact.write_bytes(content)
    root = tmp_path / "device"
    root.mkdir()
    job = _job("files", files=[FileEntry(source="app.conf", destination="/etc/app.conf", artifact=digest)])
    state = tmp_path / "state"
    context = StageContext(device_root=str(root), open_artifact=lambda requested: str(artifact), state_dir=str(state))

    report = run_stage(job, context)

    assert report.status == "succeeded"
    assert (root / "etc/app.conf").read_bytes() == content
    records = [record for _, batch in ChangeLog(str(state), "dep-123").read_path_records() for record in batch]
    assert [(record.action, record.path) for record in records[:2]] == [
        ("create_directory", str(root / "etc")),
        ("write", str(root / "etc/app.conf")),
    ]
    assert records[2].action == "temporary"
    assert not os.path.exists(records[2].path)


def test_run_stage_unexpected_exception_becomes_failed_report(tmp_path):
    def broken_download(digest: str) -> str:
        raise RuntimeError("artifact cache is corrupt")

    job = _job("files", files=[FileEntry(source="a", destination="/a", artifact="0" * 64)])

    report = run_stage(job, _context(tmp_path, open_artifact=broken_download))

    assert report.status == "failed"
    assert report.error == "unexpected error in the files stage: RuntimeError: artifact cache is corrupt"


def test_run_stage_dependencies_failure(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    job = _job("dependencies", dependencies=Dependencies.model_validate({"pip": {"packages": [{"name": "six"}]}}))

    report = run_stage(job, _context(tmp_path, extra_env={"PATH": str(fake_bin)}))

    assert report.status == "failed"
    assert report.error == f"pip install: 'python' was not found on PATH {fake_bin}"


def test_run_stage_dependencies_empty_succeeds(tmp_path):
    report = run_stage(_job("dependencies"), _context(tmp_path))

    assert report.status == "succeeded"
    assert report.steps == []


def test_run_stage_unknown_stage_fails(tmp_path):
    report = run_stage(_job("migrate"), _context(tmp_path))

    assert report.status == "failed"
    assert "unknown stage 'migrate'" in report.error


def test_run_stage_reboot_is_rejected(tmp_path):
    report = run_stage(_job("reboot"), _context(tmp_path))

    assert report.status == "failed"
    assert report.error == "reboot: the reboot stage is run by the agent's main loop, not by run_stage"


def test_run_stage_abort_during_command_reports_aborted(tmp_path):
    abort = threading.Event()
    timer = threading.Timer(0.3, abort.set)
    job = _job("after", command=CommandStage(run="echo started; sleep 30"))

    timer.start()
    try:
        report = run_stage(job, _context(tmp_path, abort_event=abort))
    finally:
        timer.cancel()

    assert report.status == "aborted"
    assert report.error == "aborted by the server during the after stage"
    assert report.steps[0].error == "aborted"
    assert report.steps[0].output == "started\n"


def test_run_stage_reports_process_starts(tmp_path):
    started = []
    job = _job("before", command=CommandStage(run="echo $$"))

    report = run_stage(job, _context(tmp_path, on_process_start=started.append))

    assert report.status == "succeeded"
    assert started == [int(report.steps[0].output)]


def test_run_stage_reports_package_manager_starts(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_python = fake_bin / "python"
    fake_python.write_text('#!/bin/bash\necho "$$ $*"\n')
    fake_python.chmod(0o755)
    started = []
    job = _job("dependencies", dependencies=Dependencies.model_validate({"pip": {"packages": [{"name": "six"}]}}))
    context = _context(
        tmp_path, extra_env={"PATH": str(fake_bin)}, state_dir=str(tmp_path / "state"), on_process_start=started.append
    )

    report = run_stage(job, context)

    assert report.status == "succeeded", report.error
    install = next(step for step in report.steps if step.name == "pip install")
    install_pid = int(install.output.splitlines()[-1].split()[0])
    assert install_pid in started
    assert len(started) >= 2


def test_run_stage_rollback_command_runs_once(tmp_path):
    counter = tmp_path / "runs"
    job = _job("rollback_command", command=CommandStage(run=f"echo run >> {counter}"))
    state = str(tmp_path / "state")

    first = run_stage(job, _context(tmp_path, state_dir=state))
    second = run_stage(job, _context(tmp_path, state_dir=state))

    assert first.status == "succeeded"
    assert second.status == "succeeded"
    assert second.steps[0].output == (
        "the rollback command already completed for this deployment, so it did not run again\n"
    )
    assert counter.read_text() == "run\n"


def test_run_stage_failed_rollback_command_runs_again(tmp_path):
    counter = tmp_path / "runs"
    job = _job("rollback_command", command=CommandStage(run=f"echo run >> {counter}; exit 3"))
    state = str(tmp_path / "state")

    first = run_stage(job, _context(tmp_path, state_dir=state))
    second = run_stage(job, _context(tmp_path, state_dir=state))

    assert first.status == "failed"
    assert first.error == "rollback_command: exited with status 3"
    assert second.status == "failed"
    assert counter.read_text() == "run\nrun\n"


def test_run_stage_rollback_command_without_state_dir_runs(tmp_path):
    job = _job("rollback_command", command=CommandStage(run="echo rolled back"))

    report = run_stage(job, _context(tmp_path))

    assert report.status == "succeeded"
    assert report.steps[0].output == "rolled back\n"


def test_run_stage_rejects_unsafe_deployment_id(tmp_path):
    job = _job("files").model_copy(update={"deployment_id": "../escape"})

    report = run_stage(job, _context(tmp_path, state_dir=str(tmp_path / "state")))

    assert report.status == "failed"
    assert "deployment id '../escape' cannot name a change log directory" in report.error
    assert not (tmp_path / "escape").exists()
