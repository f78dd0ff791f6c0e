"""The same real update to N local hosts, with Ansible and with microupdates: wall time and CPU time.

The update: a before command, two files, a pip package into a new virtual
environment, and an after command that imports the package and records the
service as started. The pip package is a wheel this script builds and
serves from a local PEP 503 index (`PIP_INDEX_URL=file://...`), so no run
needs the network after ansible-core is installed.

- Ansible: ansible-core from PyPI in its own virtual environment (created
  once, then reused from `--ansible-venv`), one inventory host per target
  with `ansible_connection=local` and its own directory, `--forks` N, no
  fact gathering.
- microupdates: the stack and one real agent per host (LocalFleet, each
  with its own device root), the deployment timed from the deploy request
  to its final status.

CPU time is user plus system time. For Ansible it is the rusage of the
`ansible-playbook` process and everything it waited for. For microupdates
it is the growth, during the deployment, of the CPU time of the Temporal
server, the worker, the API and every agent, each with the children it
waited for (bash, pip, venv). Every host must end with the new files, the
package importable and the after command's marker, or the script exits 1.

Usage: .venv/bin/python bench/vs_ansible.py --hosts 10 50 [--json results.json]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

from benchlib import (
    BenchError,
    format_table,
    machine_line,
    raise_fd_limit,
    sample_processes,
    stack_pids,
    start_stack,
    wait_for,
    wait_for_deployment,
    write_json,
)
from check_in_capacity import read_long_polls_held
from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.local_fleet import LocalFleet

PACKAGE = "benchpkg"
PACKAGE_VERSION = "1.0.0"
APP_DIRECTORY = "/opt/bench-app"
STATE_FILE = "/var/lib/bench-app/state"
# The interpreter the stages use: the first python3 on the agent's fixed PATH.
SYSTEM_PYTHON = "/usr/bin/python3"
INSTALL_TIMEOUT_SECONDS = 900
RUN_TIMEOUT_SECONDS = 300.0
RUN_SECONDS_PER_HOST = 30.0
AGENT_START_TIMEOUT_SECONDS = 120.0
LONG_POLL_SECONDS = 25
# Open files per host across this process and the stack (agent log, API socket), an estimate with room to spare.
FILES_PER_HOST = 20
SPARE_FILES = 1000


def default_ansible_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "microupdates-bench" / "ansible-venv"


def ensure_ansible(venv: Path) -> Path:
    """Install ansible-core from PyPI into `venv` unless it is there; return the ansible-playbook path."""

    playbook = venv / "bin" / "ansible-playbook"
    if playbook.exists():
        return playbook
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True,
                       timeout=INSTALL_TIMEOUT_SECONDS)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "ansible-core"],
                       check=True, capture_output=True, timeout=INSTALL_TIMEOUT_SECONDS)
    except subprocess.CalledProcessError as error:
        raise BenchError(f"Installing ansible-core into {venv} failed with status {error.returncode}: "
                         f"{error.stderr.decode()[-1500:]}") from error
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"Installing ansible-core into {venv} took over {INSTALL_TIMEOUT_SECONDS} s.") from error
    return playbook


def build_wheel(directory: Path) -> Path:
    """Write a pure-Python wheel of PACKAGE and a PEP 503 index for it; return the index directory."""

    wheels = directory / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    dist_info = f"{PACKAGE}-{PACKAGE_VERSION}.dist-info"
    files = {
        f"{PACKAGE}/__init__.py": f'VERSION = "{PACKAGE_VERSION}"\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {PACKAGE_VERSION}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(content.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = wheels / f"{PACKAGE}-{PACKAGE_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)

    project = directory / "index" / PACKAGE
    project.mkdir(parents=True, exist_ok=True)
    (project / "index.html").write_text(f'<html><body><a href="{wheel.as_uri()}">{wheel.name}</a></body></html>\n')
    return directory / "index"


def write_sources(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    sources = {"app.py": "print('bench app 1.0.0')\n" * 200, "config.json": '{"listen": "127.0.0.1:8000"}\n'}
    for name, content in sources.items():
        (directory / name).write_text(content)
    return {name: directory / name for name in sources}


def before_command(root: str) -> str:
    return f'mkdir -p "{root}/var/lib/bench-app" && echo stopped > "{root}{STATE_FILE}"'


def after_command(root: str) -> str:
    check = f"import {PACKAGE}, sys; sys.exit({PACKAGE}.VERSION != '{PACKAGE_VERSION}')"
    return f'"{root}{APP_DIRECTORY}/venv/bin/python" -c "{check}" && echo started > "{root}{STATE_FILE}"'


def write_recipe(sources: dict[str, Path], group: str) -> Path:
    """Write the recipe next to the source files, which it names relative to itself."""

    root = "$MICROUPDATES_DEVICE_ROOT"
    recipe = {
        "version": PACKAGE_VERSION,
        "comment": "comparison with Ansible",
        "targets": {"groups": [group]},
        "before": {"run": before_command(root), "timeout_seconds": 60},
        "files": [{"source": name, "destination": f"{APP_DIRECTORY}/{name}", "mode": "0644"}
                  for name, path in sources.items()],
        "dependencies": {"pip3": {"virtualenv": f"{APP_DIRECTORY}/venv",
                                  "packages": [{"name": PACKAGE, "version": PACKAGE_VERSION}]}},
        "after": {"run": after_command(root), "timeout_seconds": 60},
    }
    path = next(iter(sources.values())).parent / f"recipe-{group}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_playbook(directory: Path, sources: dict[str, Path], index: Path, hosts: list[tuple[str, Path]],
                   ansible_python: Path) -> tuple[Path, Path]:
    root = "{{ device_root }}"
    play = {
        "hosts": "all",
        "gather_facts": False,
        "environment": {"PIP_INDEX_URL": index.as_uri() + "/", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        "tasks": [
            {"name": "before", "ansible.builtin.shell": {"cmd": before_command(root), "executable": "/bin/bash"}},
            {"name": "application directory",
             "ansible.builtin.file": {"path": root + APP_DIRECTORY, "state": "directory", "mode": "0755"}},
            *({"name": f"file {name}",
               "ansible.builtin.copy": {"src": str(path), "dest": f"{root}{APP_DIRECTORY}/{name}", "mode": "0644"}}
              for name, path in sources.items()),
            {"name": "dependencies",
             "ansible.builtin.pip": {"name": f"{PACKAGE}=={PACKAGE_VERSION}",
                                     "virtualenv": f"{root}{APP_DIRECTORY}/venv",
                                     "virtualenv_command": f"{SYSTEM_PYTHON} -m venv"}},
            {"name": "after", "ansible.builtin.shell": {"cmd": after_command(root), "executable": "/bin/bash"}},
        ],
    }
    playbook = directory / "playbook.yaml"
    playbook.write_text(yaml.safe_dump([play], sort_keys=False))
    inventory = directory / "inventory.ini"
    lines = ["[all]"] + [f"{name} ansible_connection=local device_root={path} "
                         f"ansible_python_interpreter={ansible_python}" for name, path in hosts]
    inventory.write_text("\n".join(lines) + "\n")
    return playbook, inventory


def verify_host(root: Path, sources: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in sources.items():
        target = root / APP_DIRECTORY.lstrip("/") / name
        if not target.is_file() or target.read_text() != path.read_text():
            problems.append(f"{target} is missing or differs from {path}")
    state = root / STATE_FILE.lstrip("/")
    if not state.is_file() or state.read_text().strip() != "started":
        problems.append(f"{state} does not say 'started', so the after command did not run to its end")
    return problems


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ansible(count: int, playbook_path: Path, sources: dict[str, Path], index: Path, work_dir: Path,
                forks: int | None) -> dict[str, Any]:
    hosts = [(f"host-{number:03d}", work_dir / "hosts" / f"host-{number:03d}") for number in range(count)]
    for _, path in hosts:
        path.mkdir(parents=True, exist_ok=True)
    ansible_python = playbook_path.parent / "python"
    playbook, inventory = write_playbook(work_dir, sources, index, hosts, ansible_python)
    temporary = work_dir / "ansible-tmp"
    temporary.mkdir(exist_ok=True)
    environment = dict(os.environ, ANSIBLE_LOCAL_TEMP=str(temporary), ANSIBLE_REMOTE_TMP=str(temporary),
                       ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_RETRY_FILES_ENABLED="False",
                       ANSIBLE_NOCOLOR="1", ANSIBLE_HOME=str(work_dir / "ansible-home"))
    command = [str(playbook_path), "-i", str(inventory), "--forks", str(forks or count), str(playbook)]

    cpu_before = children_cpu_seconds()
    started = time.monotonic()
    completed = subprocess.run(command, cwd=work_dir, env=environment, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=RUN_TIMEOUT_SECONDS + RUN_SECONDS_PER_HOST * count,
                               check=False)
    wall_seconds = time.monotonic() - started
    cpu_seconds = children_cpu_seconds() - cpu_before
    (work_dir / "ansible.log").write_bytes(completed.stdout + completed.stderr)

    problems = []
    if completed.returncode != 0:
        problems.append(f"ansible-playbook exited with status {completed.returncode}; see {work_dir / 'ansible.log'}: "
                        f"{completed.stdout.decode()[-800:]}")
    for _, path in hosts:
        problems.extend(verify_host(path, sources))
    return {"tool": "ansible", "hosts": count, "wall_seconds": wall_seconds, "cpu_seconds": cpu_seconds,
            "problems": problems}


def run_microupdates(count: int, sources: dict[str, Path], work_dir: Path) -> dict[str, Any]:
    group = "bench"
    stack = start_stack(work_dir / "server")
    fleet = LocalFleet(server_url=stack.api_url, devices_dir=work_dir / "devices", long_poll_seconds=LONG_POLL_SECONDS)
    try:
        with OperatorApiClient(stack.api_url, stack.admin_api_key) as api:
            update_id = api.create_update_from_file(write_recipe(sources, group))["id"]
            for number in range(count):
                name = f"host-{number:03d}"
                fleet.add(name, api.register_device(name, groups=[group])["token"])
            fleet.start_all()
            wait_for(lambda: read_long_polls_held(stack.api_url) >= count, AGENT_START_TIMEOUT_SECONDS + count,
                     f"{count} agents to check in")

            pids = stack_pids(stack)
            pids.update({device.name: device.process.pid for device in fleet.devices})
            before = sample_processes(pids)
            started = time.monotonic()
            deployment = api.deploy(update_id, groups=[group])
            detail = wait_for_deployment(api, deployment["id"], RUN_TIMEOUT_SECONDS + RUN_SECONDS_PER_HOST * count,
                                         interval=0.1)
            wall_seconds = time.monotonic() - started
            after = sample_processes(pids)
    finally:
        fleet.stop_all()
        stack.stop()

    problems = []
    if detail["status"] != "succeeded":
        problems.append(f"deployment ended {detail['status']} with device statuses {detail['device_status_counts']}")
    for device in fleet.devices:
        problems.extend(verify_host(device.root, sources))
    server_cpu = sum(after[name].cpu_seconds - before[name].cpu_seconds for name in ("api", "worker", "temporal"))
    agents_cpu = sum(after[name].cpu_seconds - before[name].cpu_seconds for name in pids
                     if name not in ("api", "worker", "temporal"))
    return {"tool": "microupdates", "hosts": count, "wall_seconds": wall_seconds,
            "cpu_seconds": server_cpu + agents_cpu, "server_cpu_seconds": server_cpu,
            "agents_cpu_seconds": agents_cpu, "problems": problems}


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Apply the same update (commands, files, a pip package into a virtualenv) to N local hosts "
                    "with Ansible and with microupdates; report wall and CPU time.")
    parser.add_argument("--hosts", type=int, nargs="+", default=[10], help="numbers of hosts, e.g. 10 50")
    parser.add_argument("--forks", type=int, help="Ansible forks (default: the number of hosts)")
    parser.add_argument("--ansible-venv", type=Path, default=default_ansible_venv(),
                        help="virtual environment for ansible-core, created when missing (default: %(default)s)")
    parser.add_argument("--install-only", action="store_true",
                        help="only install ansible-core into --ansible-venv, then exit")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--work-dir", type=Path, help="keep host directories, logs and databases here")
    arguments = parser.parse_args()
    if min(arguments.hosts) < 1:
        parser.error(f"--hosts must be at least 1, got {min(arguments.hosts)}")

    started = time.monotonic()
    try:
        playbook_path = ensure_ansible(arguments.ansible_venv)
    except BenchError as error:
        print(f"vs_ansible: {error}", file=sys.stderr)
        return 2
    print(f"ansible-core ready in {arguments.ansible_venv} ({time.monotonic() - started:.1f} s)", flush=True)
    if arguments.install_only:
        return 0

    raise_fd_limit(max(arguments.hosts) * FILES_PER_HOST + SPARE_FILES)
    print(f"Machine: {machine_line()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="microupdates-vs-ansible-") as temporary:
        root = arguments.work_dir or Path(temporary)
        sources = write_sources(root / "sources")
        index = build_wheel(root / "packages")
        # The agents pass PIP_INDEX_URL on to their pip steps; the play sets it in its environment.
        os.environ["PIP_INDEX_URL"] = index.as_uri() + "/"
        for count in arguments.hosts:
            print(f"{count} hosts: Ansible ...", flush=True)
            results.append(run_ansible(count, playbook_path, sources, index, root / f"ansible-{count}",
                                       arguments.forks))
            print(f"{count} hosts: microupdates ...", flush=True)
            results.append(run_microupdates(count, sources, root / f"microupdates-{count}"))

    print(format_table(["tool", "hosts", "wall s", "CPU s", "CPU s per host"],
                       [[result["tool"], result["hosts"], result["wall_seconds"], result["cpu_seconds"],
                         result["cpu_seconds"] / result["hosts"]] for result in results]))
    failed = False
    for result in results:
        for problem in result["problems"][:10]:
            print(f"FAILED ({result['tool']}, {result['hosts']} hosts): {problem}", file=sys.stderr)
        failed = failed or bool(result["problems"])
    write_json(arguments.json, {"benchmark": "vs_ansible", "machine": machine_line(), "results": results})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
