"""Secret references on the agent: resolution into the environment, masking, and keeping values off the disk."""

from __future__ import annotations

import pytest

from microupdates.device_agent.agent import OutputTail
from microupdates.device_agent.journal import Journal
from microupdates.device_agent.stages import StageContext, run_stage
from microupdates.protocol.device_api import StageJob, StageReport, StepResult
from microupdates.protocol.recipe import CommandStage
from microupdates.protocol.secret_references import (
    MissingSecretError,
    mask_report,
    mask_secrets,
    referenced_secret_names,
    resolve_secret_references,
)

QUOTING_VALUE = "it's \"quoted\" $(touch /tmp/never) `x`"


def command_job(run: str, secrets: dict) -> StageJob:
    return StageJob(job_id=1, deployment_id="dep-s", device_id="dev-s", update_version="1", stage="before",
                    progress_interval_seconds=10, command=CommandStage(run=run), secrets=secrets)


def no_artifacts(digest: str) -> str:
    raise AssertionError(f"unexpected artifact request {digest}")


def test_referenced_names_are_sorted_and_distinct():
    texts = ["echo ${secret:B} ${secret:A}", None, "${secret:B} ${secret:bad-name} ${ secret:C}"]

    assert referenced_secret_names(texts) == ["A", "B"]


def test_resolve_rewrites_references_to_variables():
    script, env = resolve_secret_references('echo "${secret:TOKEN}"', {"TOKEN": "v", "OTHER": "w"})

    assert script == 'echo "${MICROUPDATES_SECRET_TOKEN}"'
    assert env == {"MICROUPDATES_SECRET_TOKEN": "v"}


def test_resolve_missing_secret_names_it():
    with pytest.raises(MissingSecretError, match=r"references secret\(s\) GONE, which the server did not send"):
        resolve_secret_references("echo ${secret:GONE} ${secret:HERE}", {"HERE": "x"})


def test_mask_replaces_longest_value_first():
    assert mask_secrets("pw=hunter2 user=hunter", ["hunter", "hunter2"]) == "pw=*** user=***"
    assert mask_secrets(None, ["x"]) is None
    assert mask_secrets("keep", [""]) == "keep"


def test_mask_report_covers_error_and_steps():
    step = StepResult(name="s", output="v4lue\n", error="v4lue")
    report = StageReport(status="failed", error="bad v4lue", steps=[step])

    masked = mask_report(report, ["v4lue"])

    assert masked.error == "bad ***"
    assert masked.steps[0].output == "***\n"
    assert masked.steps[0].error == "***"
    assert report.error == "bad v4lue"


def test_command_sees_value_verbatim_and_output_is_maskable(tmp_path):
    job = command_job('printf "%s" "${secret:VALUE}" > "$MICROUPDATES_DEVICE_ROOT/seen"; echo "${secret:VALUE}"',
                      {"VALUE": QUOTING_VALUE})

    report = mask_report(run_stage(job, StageContext(device_root=str(tmp_path), open_artifact=no_artifacts)),
                         job.secrets.values())

    assert report.status == "succeeded", report
    assert (tmp_path / "seen").read_text() == QUOTING_VALUE
    assert report.steps[0].output == "***\n"


def test_command_with_missing_secret_fails_without_running(tmp_path):
    job = command_job('touch "$MICROUPDATES_DEVICE_ROOT/ran"; echo ${secret:ABSENT}', {})

    report = run_stage(job, StageContext(device_root=str(tmp_path), open_artifact=no_artifacts))

    assert report.status == "failed"
    assert "ABSENT" in report.steps[0].error
    assert not (tmp_path / "ran").exists()


def test_journal_never_stores_secret_values(tmp_path):
    job = command_job("echo ${secret:KEY}", {"KEY": "journal-must-not-see"})
    journal = Journal(tmp_path)

    journal.record_started(job, "boot")
    started = (tmp_path / "journal.json").read_text()
    journal.record_finished(job, StageReport(status="succeeded"))
    finished = (tmp_path / "journal.json").read_text()

    assert "journal-must-not-see" not in started
    assert "journal-must-not-see" not in finished
    assert "${secret:KEY}" in finished


def test_output_tail_masks_secret_values():
    tail = OutputTail(secret_values=["tail-secret"])
    tail.add(b"before tail-secret after")

    assert tail.text() == "before *** after"
