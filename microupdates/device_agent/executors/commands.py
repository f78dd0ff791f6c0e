"""Running stage commands on the device without prompts, hangs or unbounded output.

Every process runs with stdin from /dev/null, in a new session (so it has no
controlling terminal and is the leader of its own process group), with stdout
and stderr merged into a bounded capture. A timeout or an abort stops the
whole process group: SIGTERM first, SIGKILL after a grace period.

The process id of each started process, which is also its process group id,
goes to an `on_start` callback, so the agent's journal can store it and stop
a group left behind by a crash with kill_process_group().
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional

from microupdates.device_agent.output import BoundedOutput
from microupdates.protocol.device_api import StepResult

logger = logging.getLogger(__name__)

BASH_PATH = "/bin/bash"
MINIMAL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CRLF_ERROR = "the script has CRLF (Windows) line endings, which bash cannot run; save it with LF line endings"

# Time a stopped process group gets between SIGTERM and SIGKILL.
STOP_GRACE_SECONDS = 2.0
# Time the output pipe may stay open after the main process has exited or
# been killed, because a background child still has it open.
PIPE_CLOSE_WAIT_SECONDS = 2.0
# Time allowed for the kernel to end a process after SIGKILL.
REAP_WAIT_SECONDS = 5.0
POLL_INTERVAL_SECONDS = 0.05
READ_CHUNK_BYTES = 64 * 1024

OutputCallback = Callable[[bytes], None]
# Called with the pid of a process just started, which is also its process group id.
ProcessStartCallback = Callable[[int], None]

# The on_start callback of run_process calls that give none, set by
# observe_process_starts() for everything a stage starts.
_default_on_start: contextvars.ContextVar[Optional[ProcessStartCallback]] = contextvars.ContextVar(
    "default_on_start", default=None
)


@contextlib.contextmanager
def observe_process_starts(callback: Optional[ProcessStartCallback]) -> Iterator[None]:
    """Make callback the on_start of every run_process call without one, in this thread, inside the block.

    The stage runner uses it so that processes started by executors that
    take no on_start parameter (package managers) are reported too.
    """

    token = _default_on_start.set(callback)
    try:
        yield
    finally:
        _default_on_start.reset(token)


class _OutputPump(threading.Thread):
    """Thread that copies a pipe into a BoundedOutput until end of file.

    After `stop_capture()` it keeps reading and discards the data. A
    background process that still has the pipe open therefore neither blocks on a
    full pipe nor gets SIGPIPE. The thread ends, and closes the pipe, when the
    last writer closes its end.
    """

    def __init__(self, pipe, output: BoundedOutput, on_output: Optional[OutputCallback], name: str) -> None:
        super().__init__(name=f"output-pump-{name}", daemon=True)
        self._command_name = name
        self._pipe = pipe
        self._output = output
        self._on_output = on_output
        self._capturing = True
        self._lock = threading.Lock()
        self._callback_failed = False

    def stop_capture(self) -> None:
        with self._lock:
            self._capturing = False

    def run(self) -> None:
        fd = self._pipe.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, READ_CHUNK_BYTES)
                except OSError as error:
                    logger.warning("Reading output of %s failed: %s", self._command_name, error)
                    return
                if not chunk:
                    return

                with self._lock:
                    if not self._capturing:
                        continue
                    self._output.write(chunk)
                self._forward(chunk)
        finally:
            self._pipe.close()

    def _forward(self, chunk: bytes) -> None:
        if self._on_output is None or self._callback_failed:
            return
        try:
            self._on_output(chunk)
        except Exception:
            # The callback feeds progress reports; a failure there must not
            # stop the capture, so it is logged once and then skipped.
            self._callback_failed = True
            logger.exception(
                "Output callback failed in %s; no more output of this command is forwarded", self._command_name
            )


def _exit_code(returncode: Optional[int]) -> Optional[int]:
    """Convert a Popen return code to the status bash reports: 128 + N for death by signal N."""

    if returncode is None or returncode >= 0:
        return returncode
    return 128 - returncode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _leader_has_exited(pid: int) -> bool:
    """Check whether the group leader has exited, without reaping it.

    An unreaped leader keeps its process group id reserved, so a later
    killpg() cannot reach an unrelated group that reused the number.
    """

    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _group_has_other_live_members(pgid: int) -> bool:
    """Check /proc for processes in the group other than its leader that are not zombies.

    Returns True when /proc cannot be read, so the caller waits the full grace period.
    """

    return _group_has_live_members(pgid, skip_pid=pgid)


def _group_has_live_members(pgid: int, skip_pid: Optional[int] = None) -> bool:
    """Check /proc for processes in the group, other than skip_pid, that are not zombies.

    Returns True when /proc cannot be read.
    """

    try:
        entries = os.listdir("/proc")
    except OSError:
        return True

    for entry in entries:
        if not entry.isdigit() or int(entry) == skip_pid:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        # The command name in field 2 may contain spaces and parentheses, so
        # the fields after it are found from the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) < 3:
            continue
        state, process_group = fields[0], fields[2]
        if process_group == str(pgid).encode() and state != b"Z":
            return True
    return False


def _signal_group(pgid: int, signal_number: int) -> None:
    try:
        os.killpg(pgid, signal_number)
    except ProcessLookupError:
        pass
    except PermissionError as error:
        logger.warning("Sending %s to process group %d failed: %s", _signal_name(signal_number), pgid, error)


def _stop_process_group(process: subprocess.Popen) -> None:
    """Stop the process's group with SIGTERM, a grace period and SIGKILL, then reap the leader.

    The leader stays unreaped until SIGKILL has been sent, so the group id
    cannot have been reused by then.
    """

    pgid = process.pid
    _signal_group(pgid, signal.SIGTERM)

    grace_deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < grace_deadline:
        if _leader_has_exited(pgid) and not _group_has_other_live_members(pgid):
            break
        time.sleep(POLL_INTERVAL_SECONDS)

    # SIGKILL is sent even when the group looks empty, because the /proc scan
    # can miss a process forked while it ran, and the signal costs nothing.
    _signal_group(pgid, signal.SIGKILL)

    try:
        process.wait(timeout=REAP_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        logger.error("Process %d did not end %g s after SIGKILL", pgid, REAP_WAIT_SECONDS)


def kill_process_group(pgid: int, grace_seconds: float = STOP_GRACE_SECONDS) -> bool:
    """Stop every process in a process group: SIGTERM, up to grace_seconds to exit, then SIGKILL.

    Returns False when no process is in the group or signalling it is not
    permitted, and True once the signals were sent. A group that ends at any
    point is not an error. Raises ValueError for pgid 0 or 1, or the agent's
    own group, which killpg would read differently or must never hit.
    NOTE: process group ids are reused, by the next boot above all. A caller
    that stored pgid before a crash must check that the group is still the one it started.
    """

    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"refusing to kill process group {pgid}: it is not a group started by a stage")

    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError as error:
        logger.warning("Sending SIGTERM to process group %d failed: %s", pgid, error)
        return False
    logger.warning("Stopping process group %d left behind by an earlier stage", pgid)

    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if not _group_has_live_members(pgid):
            break
        time.sleep(POLL_INTERVAL_SECONDS)

    _signal_group(pgid, signal.SIGKILL)
    return True


def _notify_start(callback: Optional[ProcessStartCallback], pid: int, name: str) -> None:
    if callback is None:
        return
    try:
        callback(pid)
    except Exception:
        # The callback stores the group for crash recovery; the command
        # still runs and is stopped as usual when the callback fails.
        logger.exception("Process start callback failed for %s (pid %d)", name, pid)


def _wait_for_exit_or_stop(
    process: subprocess.Popen, timeout_seconds: float, abort_event: Optional[threading.Event], timeout_error: str
) -> Optional[str]:
    """Wait until the process exits, the timeout passes or abort_event is set.

    Returns None when the process exited by itself, else the reason to stop it.
    Does not reap the process when it must be stopped.
    """

    deadline = time.monotonic() + timeout_seconds
    while True:
        if _leader_has_exited(process.pid):
            return None
        if abort_event is not None and abort_event.is_set():
            return "aborted"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return timeout_error

        interval = min(POLL_INTERVAL_SECONDS, remaining)
        if abort_event is not None:
            abort_event.wait(interval)
        else:
            time.sleep(interval)


def run_process(
    argv: List[str],
    *,
    name: str,
    timeout_seconds: float,
    env: Dict[str, str],
    cwd: str,
    abort_event: Optional[threading.Event] = None,
    on_output: Optional[OutputCallback] = None,
    timeout_error: Optional[str] = None,
    on_start: Optional[ProcessStartCallback] = None,
) -> StepResult:
    """Run argv to completion, a timeout or an abort, and return its StepResult.

    `env` is the whole environment of the process (see minimal_environment).
    `on_output` receives each chunk of output as it arrives, from another
    thread, and may receive one last chunk just after run_process returns.
    exit_code is the process's exit status, or 128 + N when signal N ended it,
    as bash reports it. error is None on exit status 0 and else one of
    "exited with status N", "killed by SIGNAME", "timed out after N s"
    (or `timeout_error` when given), "aborted" or "could not start ...".
    The output seen before a stop is kept. `on_start` gets the child's pid,
    which is its process group id, right after it starts; without it, the
    callback of an enclosing observe_process_starts() block does.
    """

    started = time.monotonic()
    output = BoundedOutput()
    logger.info("Starting %s (timeout %g s)", name, timeout_seconds)

    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as error:
        logger.error("Could not start %s: %s", name, error)
        return StepResult(
            name=name,
            duration_seconds=time.monotonic() - started,
            error=f"could not start {argv[0]} in {cwd}: {error.strerror or error}",
        )

    _notify_start(on_start if on_start is not None else _default_on_start.get(), process.pid, name)
    pump = _OutputPump(process.stdout, output, on_output, name)
    pump.start()

    if timeout_error is None:
        timeout_error = f"timed out after {timeout_seconds:g} s"
    stop_reason = _wait_for_exit_or_stop(process, timeout_seconds, abort_event, timeout_error)
    if stop_reason is None:
        process.wait()
    else:
        logger.warning("Stopping %s (process group %d): %s", name, process.pid, stop_reason)
        _stop_process_group(process)

    # After a normal exit, background children that the command started keep
    # running on purpose: a stage may start a service that must outlive it.
    # Such a child may hold the output pipe open, so the capture ends after a
    # bounded wait and the pump goes on draining the pipe in the background.
    pump.join(PIPE_CLOSE_WAIT_SECONDS)
    if pump.is_alive():
        logger.info("Output pipe of %s is still open after the command ended; background processes hold it", name)
    pump.stop_capture()

    exit_code = _exit_code(process.returncode)
    error = stop_reason
    if error is None and process.returncode is not None and process.returncode < 0:
        error = f"killed by {_signal_name(-process.returncode)}"
    elif error is None and exit_code:
        error = f"exited with status {exit_code}"

    duration = time.monotonic() - started
    logger.info("Finished %s in %.1f s: %s", name, duration, error or "succeeded")
    return StepResult(
        name=name,
        exit_code=exit_code,
        duration_seconds=duration,
        output=output.render(),
        output_truncated=output.truncated,
        error=error,
    )


def run_command(
    script: str,
    *,
    name: str,
    timeout_seconds: float,
    env: Dict[str, str],
    cwd: str,
    abort_event: Optional[threading.Event] = None,
    on_output: Optional[OutputCallback] = None,
    on_start: Optional[ProcessStartCallback] = None,
) -> StepResult:
    """Run a bash script the way run_process runs a program.

    The script runs as `/bin/bash -c script name`, so it needs no shebang and
    bash's own messages start with `name:`. Its exit status is that of its
    last command unless it sets `-e`. A script with CRLF line endings is
    rejected without running, with error CRLF_ERROR.
    """

    if "\r\n" in script:
        logger.error("Rejected %s: %s", name, CRLF_ERROR)
        return StepResult(name=name, error=CRLF_ERROR)

    argv = [BASH_PATH, "-c", script, name]
    return run_process(
        argv,
        name=name,
        timeout_seconds=timeout_seconds,
        env=env,
        cwd=cwd,
        abort_event=abort_event,
        on_output=on_output,
        on_start=on_start,
    )


def _home_directory(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/root" if uid == 0 else "/"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "root" if uid == 0 else str(uid)


def _without_agent_virtualenv(path: str) -> str:
    """Drop the bin directory of the agent's own virtualenv, if it runs in one, from a PATH value."""

    if sys.prefix == sys.base_prefix:
        return path
    agent_bin = os.path.join(sys.prefix, "bin")
    remaining_entries = [entry for entry in path.split(":") if entry and os.path.normpath(entry) != agent_bin]
    return ":".join(remaining_entries)


def minimal_environment(extra: Dict[str, str], device_root: Optional[str]) -> Dict[str, str]:
    """Build the environment for stage processes from fixed values and `extra`.

    Nothing comes from the agent's own environment, so its virtualenv, proxy
    settings or secrets do not leak into stages. `extra` overrides the fixed
    values, but an extra PATH still loses the agent virtualenv's bin directory.
    """

    uid = os.geteuid()
    user = _user_name(uid)
    environment = {
        "HOME": _home_directory(uid),
        "PATH": MINIMAL_PATH,
        "LANG": "C.UTF-8",
        "USER": user,
        "LOGNAME": user,
        "SHELL": BASH_PATH,
        "DEBIAN_FRONTEND": "noninteractive",
        "NEEDRESTART_MODE": "a",
        "MICROUPDATES_DEVICE_ROOT": device_root or "",
    }
    environment.update(extra)
    environment["PATH"] = _without_agent_virtualenv(environment["PATH"])
    return environment
