"""Each benchmark script at a tiny size: it runs, cleans up, and writes JSON that shows the work was done."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
SCRIPT_TIMEOUT_SECONDS = 240


def run_script(name: str, *arguments: str, output: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, str(BENCH_DIR / name), *arguments, "--json", str(output)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_SECONDS, check=False,
    )
    assert completed.returncode == 0, f"{name} failed:\n{completed.stdout}\n{completed.stderr[-3000:]}"
    return json.loads(output.read_text())


def test_fleet_rollout_three_devices(tmp_path: Path) -> None:
    report = run_script("fleet_rollout.py", "--devices", "3", "--work-dir", str(tmp_path / "work"),
                        output=tmp_path / "rollout.json")

    [result] = report["results"]
    assert result["devices"] == 3
    assert result["deployment_status"] == "succeeded"
    assert result["device_status_counts"] == {"succeeded": 3}
    assert result["problems"] == []
    assert result["wall_seconds"] > 0
    assert result["processes"]["api"]["peak_rss_mib"] > 0
    assert result["processes"]["worker"]["peak_rss_mib"] > 0
    assert result["bare"]["children"] == 3
    assert result["ratio_to_bare"] == pytest.approx(result["wall_seconds"] / result["bare"]["wall_seconds"])


def test_check_in_capacity_tiny(tmp_path: Path) -> None:
    report = run_script("check_in_capacity.py", "--devices", "3", "--concurrency", "2", "--warmup", "0.5",
                        "--duration", "1", "--long-polls", "4", "--work-dir", str(tmp_path / "work"),
                        output=tmp_path / "check-in.json")

    sustained = report["sustained"]
    assert sustained["check_ins"] > 0
    assert sustained["errors"] == 0
    assert sustained["p99_ms"] >= sustained["median_ms"] > 0
    long_polls = report["long_polls"]
    assert long_polls["long_polls"] == 4
    assert long_polls["held_min"] >= 4
    assert long_polls["api_rss_mib"] > 0


@pytest.fixture(scope="module")
def ansible_installed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Install ansible-core into the benchmark's cached venv, or skip when PyPI cannot provide it."""

    completed = subprocess.run(
        [sys.executable, str(BENCH_DIR / "vs_ansible.py"), "--install-only"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_SECONDS, check=False,
    )
    if completed.returncode != 0:
        pytest.skip(f"ansible-core could not be installed from PyPI: {completed.stderr.strip()[-500:]}")


def test_vs_ansible_one_host(tmp_path: Path, ansible_installed: None) -> None:
    report = run_script("vs_ansible.py", "--hosts", "1", "--work-dir", str(tmp_path / "work"),
                        output=tmp_path / "ansible.json")

    results = {result["tool"]: result for result in report["results"]}
    assert set(results) == {"ansible", "microupdates"}
    for tool, result in results.items():
        assert result["problems"] == [], tool
        assert result["hosts"] == 1
        assert result["wall_seconds"] > 0
        assert result["cpu_seconds"] > 0
