"""Diagnosis of the common apt, dpkg and pip failures, for the dependencies stage.

The functions here find who holds the dpkg lock, read the output of
`dpkg --audit`, apt-get and pip, and build errors that name the cause and
the next step. apt-get and dpkg run with LC_ALL=C.UTF-8 (see packages.py), so
the patterns below match their untranslated English messages (checked with
apt 2.6 and dpkg 1.21 on Debian 12).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

PROC_LOCKS_PATH = "/proc/locks"

# The locks apt-get and dpkg take with fcntl(F_SETLK), in the order apt takes them.
DPKG_LOCK_PATHS = (
    "/var/lib/dpkg/lock-frontend",
    "/var/lib/dpkg/lock",
    "/var/cache/apt/archives/lock",
    "/var/lib/apt/lists/lock",
)

# apt 2.x prints the holder while it waits (DPkg::Lock::Timeout) and when it
# gives up on a lock: "Could not get lock PATH. It is held by process PID (NAME)".
_APT_LOCK_HOLDER = re.compile(r"Could not get lock (/\S+?)\.? It is held by process (\d+) \(([^)\n]*)\)")
# The final errors of an apt-get run that did not get a lock. apt before 1.9
# ends the first one with " - open (11: Resource temporarily unavailable)".
_APT_LOCK_FAILURES = (
    re.compile(r"^E: Could not get lock (/\S+?)(?:\.(?:\s|$)|\s+-\s|\s*$)", re.MULTILINE),
    re.compile(r"^E: Unable to acquire the dpkg frontend lock \((/\S+)\)", re.MULTILINE),
    re.compile(r"^E: Unable to lock the administration directory \((/\S+)\)", re.MULTILINE),
)
_APT_WAITING_FOR_LOCK = "Waiting for cache lock"

_APT_MISSING_PACKAGE_PATTERNS = (
    # "E: Unable to locate package NAME"
    (re.compile(r"^E: Unable to locate package (\S+)", re.MULTILINE), "package {0}"),
    # "E: Version 'VERSION' for 'NAME' was not found"
    (re.compile(r"^E: Version '([^']*)' for '([^']*)' was not found", re.MULTILINE), "version {0} of package {1}"),
    # "E: Package 'NAME' has no installation candidate": listed, but no list offers a version of it.
    (
        re.compile(r"^E: Package '([^']*)' has no installation candidate", re.MULTILINE),
        "installable version of package {0}",
    ),
)
_APT_DPKG_INTERRUPTED = "dpkg was interrupted, you must manually run 'dpkg --configure -a'"

# pip 23.0 and later print this error code when the interpreter's stdlib
# directory contains an EXTERNALLY-MANAGED file (PEP 668).
PIP_EXTERNALLY_MANAGED = "externally-managed-environment"


@dataclass(frozen=True)
class LockHolder:
    """A process that holds one of the dpkg locks."""

    path: str
    pid: int
    command: str

    def describe(self) -> str:
        return f"process {self.pid} ({self.command})"


def read_process_name(pid: int) -> str:
    """Return the command name of a process from /proc/PID/comm, or "unknown" when it cannot be read."""

    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm_file:
            return comm_file.read().strip() or "unknown"
    except OSError:
        return "unknown"


def _file_identity(path: str) -> Optional[Tuple[int, int, int]]:
    """Return (device major, device minor, inode) of a file, the key /proc/locks uses."""

    try:
        status = os.stat(path)
    except OSError:
        return None
    return os.major(status.st_dev), os.minor(status.st_dev), status.st_ino


def _parse_proc_locks_line(line: str) -> Optional[Tuple[int, Tuple[int, int, int]]]:
    """Return (pid, file identity) of a granted lock in a /proc/locks line.

    A line reads "1: POSIX  ADVISORY  WRITE 1234 fe:00:402117 0 EOF", where
    the device numbers are hexadecimal and the inode is decimal. Lines with
    "->" are requests still waiting for the lock, so they return None, and so
    do OFD locks, whose pid is -1 because no single process owns them.
    """

    fields = line.split()
    if len(fields) < 6 or fields[1] == "->":
        return None

    try:
        pid = int(fields[4])
        major, minor, inode = fields[5].split(":")
        identity = (int(major, 16), int(minor, 16), int(inode))
    except ValueError:
        return None
    if pid <= 0:
        return None
    return pid, identity


def find_lock_holder(
    paths: Sequence[str] = DPKG_LOCK_PATHS, proc_locks_path: str = PROC_LOCKS_PATH
) -> Optional[LockHolder]:
    """Find a process that holds a lock on one of `paths`, checking them in order.

    Returns None when no lock is held, or /proc/locks cannot be read. The pid
    is as seen from this process's pid namespace, and the kernel shows 0 (so
    this returns None) for a holder outside it.
    """

    identities = {}
    for path in paths:
        identity = _file_identity(path)
        if identity is not None:
            identities.setdefault(identity, path)
    if not identities:
        return None

    try:
        with open(proc_locks_path, encoding="ascii", errors="replace") as locks_file:
            lines = locks_file.read().splitlines()
    except OSError as error:
        logger.warning("Could not read %s to find the dpkg lock holder: %s", proc_locks_path, error)
        return None

    holders = {}
    for line in lines:
        parsed = _parse_proc_locks_line(line)
        if parsed is not None and parsed[1] in identities:
            holders.setdefault(identities[parsed[1]], parsed[0])

    for path in paths:
        if path in holders:
            return LockHolder(path=path, pid=holders[path], command=read_process_name(holders[path]))
    return None


def _lock_holder_in_apt_output(output: str) -> Optional[LockHolder]:
    """Return the last lock holder apt-get named in its output."""

    matches = _APT_LOCK_HOLDER.findall(output)
    if not matches:
        return None
    path, pid, command = matches[-1]
    return LockHolder(path=path, pid=int(pid), command=command)


def _failed_lock_path(output: str) -> Optional[str]:
    """Return the lock path of apt-get's final "could not get the lock" error, if it printed one.

    The administration directory error names /var/lib/dpkg/, whose lock file is /var/lib/dpkg/lock.
    """

    for pattern in _APT_LOCK_FAILURES:
        match = pattern.search(output)
        if match is not None:
            path = match.group(1)
            return path + "lock" if path.endswith("/") else path
    return None


def _was_waiting_for_lock(output: str) -> bool:
    """Check whether apt-get's last line of output shows that it is still waiting for a lock."""

    lines = [line for line in output.splitlines() if line.strip()]
    return bool(lines) and lines[-1].startswith(_APT_WAITING_FOR_LOCK)


def is_apt_lock_failure(output: str) -> bool:
    """Check whether apt-get failed, or was stopped, because another process held a dpkg lock."""

    return _failed_lock_path(output) is not None or _was_waiting_for_lock(output)


def _describe_holder(path: str, holder: Optional[LockHolder]) -> str:
    if holder is None:
        return f"the dpkg lock {path} is held by another process, which has ended or could not be identified"
    return f"the dpkg lock {holder.path} is held by {holder.describe()}"


def _holder_for(path: str, output: str) -> Optional[LockHolder]:
    """Return the last lock holder apt-get named, else the current holder of `path` or another dpkg lock."""

    holder = _lock_holder_in_apt_output(output)
    if holder is not None:
        return holder
    return find_lock_holder([path, *DPKG_LOCK_PATHS])


def describe_apt_lock_failure(output: str, waited_seconds: float) -> Optional[str]:
    """Return an error naming the lock holder when apt-get failed because a dpkg lock was held, else None."""

    path = _failed_lock_path(output)
    if path is None:
        return None

    holder = _holder_for(path, output)
    return (
        f"{_describe_holder(path, holder)}, and apt-get gave up after waiting {waited_seconds:.0f} s for it; "
        "retry when that process has finished"
    )


def describe_apt_lock_timeout(output: str, timeout_error: str) -> Optional[str]:
    """Return a timeout error naming the lock holder when apt-get was stopped while waiting for a lock, else None."""

    if not _was_waiting_for_lock(output):
        return None

    holder = _lock_holder_in_apt_output(output)
    if holder is None:
        holder = find_lock_holder()
    if holder is None:
        return f"{timeout_error} while apt-get waited for a dpkg lock"
    return f"{timeout_error} while apt-get waited for the dpkg lock {holder.path}, which is held by {holder.describe()}"


def describe_missing_apt_packages(output: str) -> Optional[str]:
    """Return an error listing the packages apt-get could not find in its lists, or None when it reported none."""

    missing: List[str] = []
    for pattern, template in _APT_MISSING_PACKAGE_PATTERNS:
        for match in pattern.finditer(output):
            missing.append(template.format(*match.groups()))
    if not missing:
        return None

    return (
        f"apt-get found no {', '.join(missing)} in its package lists, which may be stale: check the name and version, "
        "then run `apt-get update` on the device (or add the repository that provides the package) and retry"
    )


def describe_dpkg_interrupted(output: str) -> Optional[str]:
    """Return an error when apt-get stopped because an earlier dpkg run was interrupted, else None."""

    if _APT_DPKG_INTERRUPTED not in output:
        return None
    return (
        "an earlier dpkg run was interrupted, so apt-get installed nothing: "
        "run `dpkg --configure -a` as root on the device, then retry"
    )


def unfinished_packages(audit_output: str) -> List[str]:
    """Return the package names that `dpkg --audit` lists.

    dpkg --audit prints a paragraph per problem (half configured, unpacked,
    half installed, awaiting triggers, missing files list) and under it one
    indented line per package: " NAME DESCRIPTION".
    """

    names = []
    for line in audit_output.splitlines():
        if line.startswith(" ") and line.strip():
            name = line.split()[0]
            if name not in names:
                names.append(name)
    return names


def describe_unfinished_packages(audit_output: str) -> str:
    """Return the error for a device where `dpkg --audit` reported problems, so apt-get must not run."""

    names = unfinished_packages(audit_output)
    listed = ", ".join(names) if names else "see the dpkg --audit output"
    return (
        f"dpkg reports packages left unfinished by an earlier failed or interrupted install ({listed}), "
        "so apt-get was not run: run `dpkg --configure -a` as root on the device "
        "(and fix or purge a package whose maintainer script keeps failing), then retry"
    )


def is_externally_managed_error(pip_output: str) -> bool:
    return PIP_EXTERNALLY_MANAGED in pip_output


def describe_externally_managed(manager: str, interpreter: str) -> str:
    """Return the error for a pip that rejected a system-wide install under PEP 668."""

    return (
        f"pip refused to install into {interpreter} because the distribution marks it as externally managed "
        f"(PEP 668); set dependencies.{manager}.virtualenv in the recipe"
    )


def describe_interpreter(path: str, version_output: Optional[str], version_error: Optional[str]) -> str:
    """Describe an interpreter as "PATH -> REAL PATH (Python X.Y.Z)".

    The real path, with symbolic links resolved, is shown only when it
    differs. It shows which installation a PATH entry or a virtualenv's
    `bin/python` leads to. The version is the first line of `--version`.
    """

    real_path = os.path.realpath(path)
    location = path if real_path == path else f"{path} -> {real_path}"

    lines = (version_output or "").strip().splitlines()
    if version_error is None and lines:
        version = lines[0].strip()
    else:
        version = f"--version failed: {version_error or 'no output'}"
    return f"{location} ({version})"
