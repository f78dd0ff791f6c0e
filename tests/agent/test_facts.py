"""Facts the agent reports at check-in, and the transient flag of its stage reports."""

from __future__ import annotations

import os
import sys

from microupdates.device_agent.executors.files import ArtifactDownloadError
from microupdates.device_agent.facts import collect_facts, read_os_id
from microupdates.device_agent.stages import StageContext, run_stage
from microupdates.protocol.device_api import StageJob
from microupdates.protocol.recipe import CommandStage, FileEntry

SHA256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def make_program(bin_dir, name: str, exit_code: int = 0) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    path.chmod(0o755)


def test_collect_facts_lists_programs_on_stage_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apt-get", "dpkg", "npm"):
        make_program(bin_dir, name)
    # A `python` whose pip does not run.
    make_program(bin_dir, "python", exit_code=1)
    os.symlink(os.path.realpath(sys.executable), bin_dir / "python3")

    facts = collect_facts({"PATH": str(bin_dir)}, str(tmp_path))

    assert "apt" in facts.package_managers
    assert "npm" in facts.package_managers
    assert "python3" in facts.package_managers
    assert "pip" not in facts.package_managers
    assert facts.python_version == ".".join(str(part) for part in sys.version_info[:3])
    assert facts.free_disk_bytes is not None


def test_collect_facts_without_programs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    facts = collect_facts({"PATH": str(empty)}, str(tmp_path))

    assert facts.package_managers == []
    assert facts.python_version is None


def test_collect_facts_needs_both_apt_get_and_dpkg(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make_program(bin_dir, "apt-get")

    facts = collect_facts({"PATH": str(bin_dir)}, str(tmp_path))

    assert "apt" not in facts.package_managers


def test_read_os_id_strips_quotes(tmp_path):
    os_release = tmp_path / "os-release"
    os_release.write_text('NAME="Raspbian GNU/Linux"\nID="raspbian"\nID_LIKE=debian\n')

    assert read_os_id(str(os_release)) == "raspbian"
    assert read_os_id(str(tmp_path / "missing")) is None


def test_failed_download_reported_transient(tmp_path):
    def unavailable(digest: str) -> str:
        raise ArtifactDownloadError(f"downloading artifact {digest} failed 3 times: HTTP 503")

    job = StageJob(
        job_id=9, deployment_id="dep-1", device_id="dev-1", update_version="1.0.0", stage="files",
        progress_interval_seconds=10,
        files=[FileEntry(source="a.txt", destination="/opt/a.txt", artifact=SHA256, kind="file", size_bytes=1)],
    )

    report = run_stage(job, StageContext(device_root=str(tmp_path), open_artifact=unavailable))

    assert report.status == "failed"
    assert report.transient is True
    assert "HTTP 503" in report.error
    assert report.steps[0].transient is True


def test_failed_command_reported_permanent(tmp_path):
    job = StageJob(
        job_id=10, deployment_id="dep-1", device_id="dev-1", update_version="1.0.0", stage="before",
        progress_interval_seconds=10, command=CommandStage(run="exit 3"),
    )

    report = run_stage(job, StageContext(device_root=str(tmp_path), open_artifact=lambda digest: digest))

    assert report.status == "failed"
    assert report.transient is False
    assert report.exit_code == 3
