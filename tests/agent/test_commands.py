from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from microupdates.device_agent.executors.commands import (
    CRLF_ERROR,
    MINIMAL_PATH,
    STOP_GRACE_SECONDS,
    kill_process_group,
    minimal_environment,
    observe_process_starts,
    run_command,
    run_process,
)


def _run(script: str, tmp_path: Path, timeout_seconds: float = 10, **kwargs):
    return run_command(
        script,
        name="test",
        timeout_seconds=timeout_seconds,
        env=minimal_environment({}, None),
        cwd=str(tmp_path),
        **kwargs,
    )


def _is_running(pid: int) -> bool:
    """Check whether pid is a live process. Zombies count as dead because they have ended."""

    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    state = stat[stat.rfind(b")") + 2:].split()[0]
    return state != b"Z"


def _kill_if_running(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_run_command_exit_zero(tmp_path):
    result = _run("echo hello; echo oops >&2", tmp_path)

    assert result.exit_code == 0
    assert result.error is None
    assert result.output == "hello\noops\n"
    assert result.output_truncated is False
    assert result.name == "test"


def test_run_command_exit_nonzero(tmp_path):
    result = _run("echo partial; exit 7", tmp_path)

    assert result.exit_code == 7
    assert result.error == "exited with status 7"
    assert result.output == "partial\n"


def test_run_command_killed_by_signal(tmp_path):
    result = _run("kill -SEGV $$", tmp_path)

    assert result.exit_code == 128 + signal.SIGSEGV
    assert result.error == "killed by SIGSEGV"


def test_run_command_runs_bash_without_shebang(tmp_path):
    result = _run('declare -A table=([key]=value); echo "${table[key]} $BASH_VERSION"', tmp_path)

    assert result.error is None
    assert result.output.startswith("value ")


def test_run_command_uses_cwd(tmp_path):
    result = _run("pwd", tmp_path)

    assert result.output == f"{tmp_path}\n"


def test_run_command_timeout_kills_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()

    result = _run(f"sleep 300 & echo $! > {pid_file}; echo started; sleep 300", tmp_path, timeout_seconds=1)

    elapsed = time.monotonic() - started
    child_pid = int(pid_file.read_text())
    try:
        assert elapsed < 1 + STOP_GRACE_SECONDS + 1.5
        assert result.error == "timed out after 1 s"
        assert result.exit_code == 128 + signal.SIGTERM
        assert result.output == "started\n"
        assert not _is_running(child_pid)
    finally:
        _kill_if_running(child_pid)


def test_run_command_timeout_escalates_to_sigkill(tmp_path):
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()

    result = _run(f"trap '' TERM; sleep 300 & echo $! > {pid_file}; sleep 300", tmp_path, timeout_seconds=1)

    elapsed = time.monotonic() - started
    child_pid = int(pid_file.read_text())
    try:
        assert 1 + STOP_GRACE_SECONDS - 0.2 < elapsed < 1 + STOP_GRACE_SECONDS + 1.5
        assert result.exit_code == 128 + signal.SIGKILL
        assert result.error == "timed out after 1 s"
        assert not _is_running(child_pid)
    finally:
        _kill_if_running(child_pid)


def test_run_command_background_child_does_not_hang(tmp_path):
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()

    result = _run(f"sleep 30 & echo $! > {pid_file}; echo done", tmp_path, timeout_seconds=20)

    elapsed = time.monotonic() - started
    child_pid = int(pid_file.read_text())
    try:
        assert elapsed < 5
        assert result.error is None
        assert result.exit_code == 0
        assert result.output == "done\n"
        # Background services started by a stage must survive it.
        assert _is_running(child_pid)
    finally:
        _kill_if_running(child_pid)


def test_run_command_stdin_is_at_eof(tmp_path):
    result = _run('read x; echo "rc=$?"; cat; echo "cat rc=$?"', tmp_path, timeout_seconds=5)

    assert result.output == "rc=1\ncat rc=0\n"


def test_run_command_has_no_terminal(tmp_path):
    result = _run("if (exec 3</dev/tty) 2>/dev/null; then echo has-tty; else echo no-tty; fi", tmp_path)

    assert result.output == "no-tty\n"


def test_run_command_runs_in_own_process_group(tmp_path):
    result = _run("echo $$; cat /proc/$$/stat", tmp_path)

    pid_line, stat_line = result.output.splitlines()
    fields = stat_line[stat_line.rfind(")") + 2:].split()
    process_group, session = int(fields[2]), int(fields[3])
    assert process_group == int(pid_line)
    assert session == int(pid_line)
    assert process_group != os.getpgrp()


def test_run_command_output_over_cap_is_cut(tmp_path):
    script = "printf START; head -c 300000 /dev/zero | tr '\\0' x; printf END"

    result = _run(script, tmp_path)

    assert result.error is None
    assert result.output_truncated is True
    assert result.output.startswith("START" + "x" * 100)
    assert result.output.endswith("x" * 100 + "END")
    assert "bytes cut ...]" in result.output
    assert len(result.output.encode("utf-8")) <= 64 * 1024


def test_run_command_non_utf8_output_is_readable(tmp_path):
    result = _run("printf 'a\\xff\\xfeb'", tmp_path)

    assert result.output == "a\\xff\\xfeb"


def test_run_command_crlf_script_is_rejected(tmp_path):
    marker = tmp_path / "ran"

    result = _run(f"touch {marker}\r\necho hi\r\n", tmp_path)

    assert result.error == CRLF_ERROR
    assert result.exit_code is None
    assert not marker.exists()


def test_run_command_abort_event_stops_command(tmp_path):
    abort = threading.Event()
    timer = threading.Timer(0.5, abort.set)
    timer.start()
    started = time.monotonic()

    try:
        result = _run("echo working; sleep 60", tmp_path, timeout_seconds=60, abort_event=abort)
    finally:
        timer.cancel()

    assert time.monotonic() - started < 0.5 + STOP_GRACE_SECONDS + 1
    assert result.error == "aborted"
    assert result.output == "working\n"


def test_run_command_on_output_receives_chunks(tmp_path):
    chunks = []

    result = _run("echo one; echo two", tmp_path, on_output=chunks.append)

    assert result.error is None
    assert b"".join(chunks) == b"one\ntwo\n"


def test_run_command_on_output_failure_keeps_capture(tmp_path):
    def fail(chunk: bytes) -> None:
        raise RuntimeError("progress sink is broken")

    result = _run("echo one; sleep 0.1; echo two", tmp_path, on_output=fail)

    assert result.error is None
    assert result.output == "one\ntwo\n"


def _start_in_thread(script: str, tmp_path: Path, **kwargs):
    """Start _run(script) in a thread and return (thread, results list, pids list filled by on_start)."""

    results = []
    pids = []

    def target():
        results.append(_run(script, tmp_path, timeout_seconds=30, on_start=pids.append, **kwargs))

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 10
    while not pids and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread, results, pids


def test_run_command_on_start_gets_process_group(tmp_path):
    result_pids = []

    result = _run("echo $$", tmp_path, on_start=result_pids.append)

    assert result.error is None
    assert result_pids == [int(result.output)]


def test_kill_process_group_stops_started_group(tmp_path):
    pid_file = tmp_path / "background.pid"
    thread, results, pids = _start_in_thread(f"sleep 60 & echo $! > {pid_file}; wait", tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the command did not start its background process"
            time.sleep(0.01)
        background = int(pid_file.read_text())
        assert os.getpgid(pids[0]) == pids[0]
        assert os.getpgid(background) == pids[0]

        assert kill_process_group(pids[0]) is True

        thread.join(10)
        assert results[0].error == "killed by SIGTERM"
        assert not _is_running(background)
        # The orphaned background child is reaped by init a moment later; until
        # then its zombie still belongs to the group.
        deadline = time.monotonic() + 5
        while _group_exists(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kill_process_group(pids[0]) is False
    finally:
        for pid in pids:
            _kill_if_running(pid)
        thread.join(10)


def test_kill_process_group_escalates_to_sigkill(tmp_path):
    thread, results, pids = _start_in_thread("trap '' TERM; echo ready; sleep 60", tmp_path)
    try:
        time.sleep(0.3)
        started = time.monotonic()

        assert kill_process_group(pids[0], grace_seconds=0.5) is True

        thread.join(10)
        assert time.monotonic() - started < 5
        assert results[0].error == "killed by SIGKILL"
    finally:
        for pid in pids:
            _kill_if_running(pid)
        thread.join(10)


def test_kill_process_group_missing_group():
    # A pid above the kernel's maximum cannot be in use.
    max_pid = int(Path("/proc/sys/kernel/pid_max").read_text())

    assert kill_process_group(max_pid + 1) is False


def test_kill_process_group_rejects_own_group():
    with pytest.raises(ValueError):
        kill_process_group(os.getpgrp())
    with pytest.raises(ValueError):
        kill_process_group(0)


def test_observe_process_starts_reaches_nested_calls(tmp_path):
    observed = []

    with observe_process_starts(observed.append):
        first = _run("echo $$", tmp_path)
        second = _run("echo $$", tmp_path)
    after = _run("echo $$", tmp_path)

    assert observed == [int(first.output), int(second.output)]
    assert after.error is None
    assert len(observed) == 2


def test_run_process_missing_program(tmp_path):
    result = run_process(
        [str(tmp_path / "no-such-program")],
        name="missing",
        timeout_seconds=5,
        env=minimal_environment({}, None),
        cwd=str(tmp_path),
    )

    assert result.exit_code is None
    assert result.error.startswith("could not start ")
    assert "No such file or directory" in result.error


def test_minimal_environment_values():
    env = minimal_environment({"EXTRA": "1"}, "/srv/device")

    assert env["PATH"] == MINIMAL_PATH
    assert "/usr/local/bin" in env["PATH"].split(":")
    assert env["LANG"] == "C.UTF-8"
    assert env["SHELL"] == "/bin/bash"
    assert env["DEBIAN_FRONTEND"] == "noninteractive"
    assert env["NEEDRESTART_MODE"] == "a"
    assert env["MICROUPDATES_DEVICE_ROOT"] == "/srv/device"
    assert env["EXTRA"] == "1"
    assert env["USER"] == env["LOGNAME"]
    if os.geteuid() == 0:
        assert env["HOME"] == "/root"


def test_minimal_environment_without_device_root():
    env = minimal_environment({}, None)

    assert env["MICROUPDATES_DEVICE_ROOT"] == ""


def test_minimal_environment_drops_agent_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("MICROUPDATES_TEST_SECRET", "do-not-leak")

    env = minimal_environment({}, None)
    result = _run("env", tmp_path)

    assert "MICROUPDATES_TEST_SECRET" not in env
    assert "do-not-leak" not in result.output
    assert "VIRTUAL_ENV" not in env


IN_VIRTUALENV = sys.prefix != sys.base_prefix


@pytest.mark.skipif(not IN_VIRTUALENV, reason="the tests do not run inside a virtualenv")
def test_minimal_environment_excludes_agent_virtualenv():
    agent_bin = os.path.join(sys.prefix, "bin")

    env = minimal_environment({"PATH": f"{agent_bin}:/usr/bin"}, None)

    assert env["PATH"] == "/usr/bin"


@pytest.mark.skipif(not IN_VIRTUALENV, reason="the tests do not run inside a virtualenv")
def test_run_command_python3_is_not_agent_virtualenv(tmp_path):
    result = _run("command -v python3 || echo none", tmp_path)

    assert not result.output.startswith(sys.prefix + "/")
    assert result.error is None


def _group_exists(process_group: int) -> bool:
    try:
        os.killpg(process_group, 0)
    except ProcessLookupError:
        return False
    return True
