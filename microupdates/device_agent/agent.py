"""The agent's main loop: check in, run the stage it is given, report the result exactly once."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

from microupdates import __version__
from microupdates.device_agent.client import (
    CredentialsRejectedError,
    DeviceApiClient,
    DeviceApiError,
    JobGoneError,
)
from microupdates.device_agent.config import AgentConfig
from microupdates.device_agent.credentials import DeviceCredentials
from microupdates.device_agent.change_log import CHANGES_DIRECTORY, ChangeLog
from microupdates.device_agent.executors.commands import kill_process_group, minimal_environment
from microupdates.device_agent.executors.files import ArtifactDownloadError
from microupdates.device_agent.facts import collect_facts
from microupdates.device_agent.job_verification import REJECTION_PREFIX, JobRejectedError, JobVerifier
from microupdates.device_agent.journal import Journal
from microupdates.device_agent.output import shrink_report
from microupdates.device_agent.stages import StageContext, run_stage
from microupdates.protocol.device_api import (
    REBOOT_STAGE,
    STAGE_FAILED,
    STAGE_INTERRUPTED,
    STAGE_SUCCEEDED,
    CheckInResponse,
    DeviceFacts,
    StageJob,
    StageReport,
)
from microupdates.protocol.secret_references import mask_report, mask_secrets

logger = logging.getLogger(__name__)

RETRY_MIN_SECONDS = 1.0
DOWNLOAD_ATTEMPTS = 3
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# How long a reboot command may return without the device going down before the stage fails.
REBOOT_GRACE_SECONDS = 300
PROGRESS_RETRY_SECONDS = 2.0
# Rollback records of this many deployments, the current one included, stay on disk.
KEPT_CHANGE_LOGS = 5
# Step output kept, in bytes, in each smaller report sent after the API
# rejects a report as too large (HTTP 413); 0 sends the steps without output.
SHRUNK_REPORT_OUTPUT_BYTES = (4096, 0)


class AgentStopped(Exception):
    """Raised inside the loop when the agent was asked to stop."""


class Agent:
    def __init__(self, config: AgentConfig, stop_event: Optional[threading.Event] = None) -> None:
        self.config = config
        self.stop_event = stop_event or threading.Event()
        self.journal = Journal(config.state_dir)
        self.artifact_dir = config.state_dir / "artifacts"
        self.client = DeviceApiClient(config.server_url, verify=config.tls_verification())
        self.credentials = DeviceCredentials(config, self.client)
        self.verifier = JobVerifier(config.state_dir, config.server_public_key)
        self.facts: Optional[DeviceFacts] = None

    def run(self) -> None:
        """Run until the stop event is set."""

        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir.mkdir(exist_ok=True)
        logger.info(
            "Agent %s started: server %s, state directory %s, device root %s",
            __version__, self.config.server_url, self.config.state_dir, self.config.device_root or "(none)",
        )
        try:
            self._ensure_credentials()
            self._recover_journal()
            self._refresh_facts()
            self._poll_forever()
        except AgentStopped:
            logger.info("Agent stopped")
        finally:
            self.client.close()

    def _ensure_credentials(self) -> None:
        token = self.credentials.load()
        while token is None:
            token = self._enrol()
        while not self.verifier.is_pinned():
            self._pin_server_key()

    def _pin_server_key(self) -> None:
        """Pin the key and device id the server presents, for an agent that was given a token instead of enrolling."""

        try:
            identity = self.client.read_identity()
        except DeviceApiError as error:
            logger.warning("Reading this device's identity failed: %s", error)
            self._sleep(self.config.retry_max_seconds)
            return
        if not self.config.server_public_key:
            logger.warning(
                "No server_public_key is set; trusting the key the server presents now (%s) for every later job",
                identity.server_public_key,
            )
        self.verifier.pin(identity.device_id, identity.server_public_key)

    def _enrol(self) -> Optional[str]:
        if not self.config.enrolment_key or not self.config.device_name:
            raise SystemExit(
                "No device token: set device_token, or enrolment_key and device_name to enrol this device."
            )
        try:
            response = self.client.enrol(self.config.enrolment_key, self.config.device_name, self.config.tags)
        except DeviceApiError as error:
            logger.warning("Enrolment of %s failed: %s", self.config.device_name, error)
            self._sleep(self.config.retry_max_seconds)
            return None
        self.credentials.save_enrolled(response.device_id, response.device_token)
        try:
            self.verifier.pin(response.device_id, response.server_public_key)
        except JobRejectedError as error:
            raise SystemExit("Enrolment of %s: %s" % (self.config.device_name, error)) from error
        logger.info("Enrolled as device %s in groups %s", response.device_id, response.groups)
        return response.device_token

    def _recover_journal(self) -> None:
        entry = self.journal.read()
        if entry is None:
            return
        job = StageJob.model_validate(entry["job"])
        if entry["state"] == "running":
            # After a reboot the recorded group ids may belong to unrelated processes, so only
            # groups from the same boot are killed.
            if entry.get("boot_id") == read_boot_id():
                for process_group in entry.get("process_groups", []):
                    if kill_process_group(process_group):
                        logger.warning("Killed process group %d left by the interrupted stage", process_group)
            report = StageReport(
                status=STAGE_INTERRUPTED,
                transient=True,
                error="the agent restarted during the %s stage, so its outcome is unknown" % job.stage,
            )
            logger.warning("Job %d (%s) was interrupted by a restart; reporting it", job.job_id, job.stage)
            self.journal.record_finished(job, report)
        elif entry["state"] == "rebooting":
            report = self._reboot_report(entry["boot_id"])
            self.journal.record_finished(job, report)
        else:
            report = StageReport.model_validate(entry["report"])
        self._deliver_report(job, report)

    def _reboot_report(self, boot_id_before: str) -> StageReport:
        if self.config.restart_instead_of_reboot:
            return StageReport(status=STAGE_SUCCEEDED, error=None, exit_code=0)
        if read_boot_id() == boot_id_before:
            return StageReport(
                status=STAGE_FAILED,
                error="the agent restarted but the device did not reboot (same boot id)",
            )
        return StageReport(status=STAGE_SUCCEEDED, exit_code=0)

    def _poll_forever(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:
                self.credentials.rotate_if_due()
                response = self.client.check_in(__version__, self.config.long_poll_seconds, self.facts)
                failures = 0
            except CredentialsRejectedError as error:
                if self.credentials.fall_back_after_rejection():
                    continue
                logger.error("The server rejected this device's token: %s", error)
                failures += 1
                self._sleep(self._backoff(failures))
                continue
            except DeviceApiError as error:
                failures += 1
                delay = self._backoff(failures)
                logger.warning("Check-in failed (%s); retrying in %.0f s", error, delay)
                self._sleep(delay)
                continue

            if response.job is not None:
                self._run_verified_job(response)
                # A stage may have installed or removed a package manager.
                self._refresh_facts()

    def _run_verified_job(self, response: CheckInResponse) -> None:
        """Run the job only when it passes verification; otherwise run nothing and report the rejection."""

        try:
            job = self.verifier.accept(response)
        except JobRejectedError as error:
            job_id = response.job.job_id if response.job is not None else None
            logger.error("Rejected job %s: %s%s", job_id, REJECTION_PREFIX, error)
            if job_id is not None:
                self._send_report(job_id, StageReport(status=STAGE_FAILED, error=REJECTION_PREFIX + str(error)))
            return
        self._run_job(job)

    def _refresh_facts(self) -> None:
        device_root = str(self.config.device_root) if self.config.device_root else None
        env = minimal_environment(self._passed_environment(), device_root)
        self.facts = collect_facts(env, device_root or "/")
        logger.info("Device facts: package managers %s, python3 %s, %s on %s",
                    ", ".join(self.facts.package_managers) or "none", self.facts.python_version or "missing",
                    self.facts.architecture, self.facts.os_id)

    def _run_job(self, job: StageJob) -> None:
        logger.info("Job %d: %s stage of deployment %s (update %s)", job.job_id, job.stage, job.deployment_id,
                    job.update_version)
        if job.stage == REBOOT_STAGE:
            self._reboot(job)
            return
        self.journal.record_started(job, read_boot_id())

        abort_event = threading.Event()
        tail = OutputTail(secret_values=list(job.secrets.values()))
        reporter = ProgressReporter(self.client, job, abort_event, tail)
        reporter.start()
        prune_change_logs(self.config.state_dir, keep_deployment=job.deployment_id)
        try:
            context = StageContext(
                device_root=str(self.config.device_root) if self.config.device_root else None,
                open_artifact=self._open_artifact,
                abort_event=abort_event,
                extra_env=self._passed_environment(),
                on_output=tail.add,
                state_dir=str(self.config.state_dir),
                on_process_start=self.journal.record_process_group,
            )
            report = mask_report(run_stage(job, context), job.secrets.values())
        finally:
            reporter.stop()
        self._clear_artifacts()

        self.journal.record_finished(job, report)
        logger.info("Job %d: %s stage %s%s", job.job_id, job.stage, report.status,
                    (": " + report.error) if report.error else "")
        self._deliver_report(job, report)

    def _reboot(self, job: StageJob) -> None:
        """Reboot the device; the report is sent by the agent that starts after it, from the journal."""

        self.journal.record_rebooting(job, read_boot_id())
        if self.config.restart_instead_of_reboot:
            logger.warning("Job %d: restarting the agent in place of a reboot", job.job_id)
            self.client.close()
            os.execv(sys.executable, [sys.executable, "-m", "microupdates.device_agent.main"] + sys.argv[1:])

        logger.warning("Job %d: rebooting with %s", job.job_id, " ".join(self.config.reboot_command))
        try:
            subprocess.run(self.config.reboot_command, stdin=subprocess.DEVNULL, timeout=60, check=True)
            self._sleep(REBOOT_GRACE_SECONDS)
            error = "the reboot command returned but the device did not go down within %d s" % REBOOT_GRACE_SECONDS
        except (OSError, subprocess.SubprocessError) as failure:
            error = "the reboot command %s failed: %s" % (self.config.reboot_command, failure)
        report = StageReport(status=STAGE_FAILED, error=error)
        self.journal.record_finished(job, report)
        self._deliver_report(job, report)

    def _passed_environment(self) -> Dict[str, str]:
        return {name: os.environ[name] for name in self.config.pass_environment if name in os.environ}

    def _deliver_report(self, job: StageJob, report: StageReport) -> None:
        self._send_report(job.job_id, report)
        self.journal.clear()

    def _send_report(self, job_id: int, report: StageReport) -> None:
        """Send the report until the server has it; the server ignores repeats, so retrying is safe."""

        failures = 0
        smaller_sizes = list(SHRUNK_REPORT_OUTPUT_BYTES)
        while True:
            try:
                self.client.report_stage(job_id, report)
                return
            except JobGoneError as error:
                logger.warning("Job %d: the server no longer takes its report: %s", job_id, error)
                return
            except DeviceApiError as error:
                if error.status_code == 413:
                    if not smaller_sizes:
                        logger.error("Job %d: the server rejects even the report without output: %s", job_id, error)
                        return
                    max_bytes = smaller_sizes.pop(0)
                    logger.warning("Job %d: report too large (%s); sending it with at most %d bytes of output per step",
                                   job_id, error, max_bytes)
                    report = shrink_report(report, max_bytes)
                    continue
                failures += 1
                delay = self._backoff(failures)
                logger.warning("Job %d: report failed (%s); retrying in %.0f s", job_id, error, delay)
                self._sleep(delay)

    def _open_artifact(self, sha256: str) -> str:
        destination = self.artifact_dir / sha256
        if destination.exists():
            return str(destination)
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                self.client.download_artifact(sha256, destination)
                return str(destination)
            except DeviceApiError as error:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise ArtifactDownloadError(
                        "downloading artifact %s failed %d times: %s" % (sha256, DOWNLOAD_ATTEMPTS, error)
                    ) from error
                logger.warning("Download of %s failed (attempt %d): %s", sha256, attempt, error)
                self._sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    def _clear_artifacts(self) -> None:
        shutil.rmtree(self.artifact_dir, ignore_errors=True)
        self.artifact_dir.mkdir(exist_ok=True)

    def _backoff(self, failures: int) -> float:
        return min(self.config.retry_max_seconds, RETRY_MIN_SECONDS * 2 ** min(failures - 1, 10))

    def _sleep(self, seconds: float) -> None:
        if self.stop_event.wait(seconds):
            raise AgentStopped()


class OutputTail:
    """The last bytes of a running stage's output, sent with progress reports."""

    MAX_BYTES = 4096

    def __init__(self, secret_values: Optional[List[str]] = None) -> None:
        self._data = b""
        self._lock = threading.Lock()
        self._secret_values = secret_values or []

    def add(self, chunk: bytes) -> None:
        with self._lock:
            self._data = (self._data + chunk)[-self.MAX_BYTES:]

    def text(self) -> str:
        with self._lock:
            text = self._data.decode("utf-8", errors="backslashreplace")
        # NOTE: a secret cut in two by the start of the tail is not masked.
        return mask_secrets(text, self._secret_values) or ""


class ProgressReporter:
    """Posts progress while a stage runs, and sets the abort event when the server requests it."""

    def __init__(self, client: DeviceApiClient, job: StageJob, abort_event: threading.Event, tail: OutputTail) -> None:
        self.client = client
        self.job = job
        self.abort_event = abort_event
        self.tail = tail
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-%d" % job.job_id, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # The thread may be inside a long poll; it ends by itself when that returns.
        self._stopped.set()

    def _run(self) -> None:
        """Keep one progress long poll open at a time; each one heartbeats the stage on the server."""

        while not self._stopped.is_set():
            try:
                response = self.client.report_progress(
                    self.job.job_id, self.tail.text(), self.job.progress_interval_seconds
                )
            except JobGoneError as error:
                if not self._stopped.is_set():
                    logger.warning("Job %d ended on the server (%s); stopping the stage", self.job.job_id, error)
                    self.abort_event.set()
                return
            except DeviceApiError as error:
                logger.warning("Job %d: progress report failed: %s", self.job.job_id, error)
                self._stopped.wait(PROGRESS_RETRY_SECONDS)
                continue
            if response.abort and not self._stopped.is_set():
                logger.warning("Job %d: the server asked to abort the stage", self.job.job_id)
                self.abort_event.set()
                return



def prune_change_logs(state_dir: Path, keep_deployment: str) -> None:
    """Delete the rollback records of all but the newest deployments.

    A deployment's records must outlive its last stage, because the server may
    still request a revert after a lost device returns. The newest
    KEPT_CHANGE_LOGS deployments keep theirs.
    """

    changes = state_dir / CHANGES_DIRECTORY
    if not changes.is_dir():
        return
    directories = sorted(
        (path for path in changes.iterdir() if path.is_dir() and path.name != keep_deployment),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for stale in directories[KEPT_CHANGE_LOGS - 1:]:
        ChangeLog(str(state_dir), stale.name).discard()
        logger.info("Deleted the rollback records of deployment %s", stale.name)


def read_boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""
