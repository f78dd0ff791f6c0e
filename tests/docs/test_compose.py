"""docker-compose.yml describes a topology that can run: checked by parsing it, since no Docker engine is available.

The checks tie the compose file to the code: console scripts from
pyproject.toml, ServerSettings for every MICROUPDATES_* variable, the
Temporal and PostgreSQL service names, and deploy/postgres-init.sql.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml
from sqlalchemy.engine import make_url

from microupdates.settings import ServerSettings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; pytest depends on tomli there.
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
POSTGRES_INIT_SQL = REPO_ROOT / "deploy" / "postgres-init.sql"

ENV_PREFIX = "MICROUPDATES_"
APP_SERVICES = {"api": "microupdates-api", "worker": "microupdates-worker"}
REQUIRED_SERVICES = ["postgresql", "temporal", "temporal-ui", "api", "worker"]
# Services that others wait for or that devices reach.
HEALTHCHECKED_SERVICES = ["postgresql", "temporal", "api"]
# Settings that every API and worker process of one installation must share.
SHARED_SETTINGS = ["DATABASE_URL", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TASK_QUEUE", "ARTIFACT_DIR"]


def read_environment(service: str) -> Dict[str, str]:
    """Return a service's environment as a dict, from either compose syntax (mapping or KEY=VALUE list)."""

    raw = SERVICES[service].get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def list_container_ports(service: str) -> List[int]:
    """Return the container side of each published port of a service (short or long syntax)."""

    ports = []
    for entry in SERVICES[service].get("ports") or []:
        if isinstance(entry, dict):
            ports.append(int(entry["target"]))
        else:
            ports.append(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def read_dependency_condition(service: str, dependency: str) -> Optional[str]:
    depends_on = SERVICES[service].get("depends_on") or {}
    if isinstance(depends_on, list):
        return "listed without a condition" if dependency in depends_on else None
    entry = depends_on.get(dependency)
    return None if entry is None else entry.get("condition", "no condition")


@pytest.mark.parametrize("service", REQUIRED_SERVICES)
def test_service_exists(service: str):
    assert service in SERVICES


@pytest.mark.parametrize("service", sorted(APP_SERVICES))
def test_app_service_builds_from_repository(service: str):
    build = SERVICES[service].get("build")
    assert build is not None, f"{service} must be built from this repository"

    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (REPO_ROOT / context).resolve() == REPO_ROOT
    assert (REPO_ROOT / context / dockerfile).is_file()


@pytest.mark.parametrize("service", sorted(APP_SERVICES))
def test_app_service_command_is_console_script(service: str):
    command = SERVICES[service]["command"]
    argv = command if isinstance(command, list) else shlex.split(command)

    assert argv[0] == APP_SERVICES[service]
    assert argv[0] in PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("service", sorted(APP_SERVICES))
def test_app_service_settings_are_valid(service: str, monkeypatch: pytest.MonkeyPatch):
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    variables = {key: value for key, value in read_environment(service).items() if key.startswith(ENV_PREFIX)}
    values = {key[len(ENV_PREFIX):].lower(): value for key, value in variables.items()}

    unknown = sorted(key for key in variables if key[len(ENV_PREFIX):].lower() not in ServerSettings.model_fields)
    assert not unknown, f"{service} sets variables that ServerSettings does not read: {unknown}"
    settings = ServerSettings(**values)
    assert settings.resolved_database_url().startswith("postgresql+psycopg://")


@pytest.mark.parametrize("name", SHARED_SETTINGS)
def test_api_and_worker_share_setting(name: str):
    key = ENV_PREFIX + name

    assert read_environment("api").get(key) == read_environment("worker").get(key)


def test_temporal_address_is_temporal_service():
    host, _, port = read_environment("worker")["MICROUPDATES_TEMPORAL_ADDRESS"].rpartition(":")

    assert host == "temporal"
    assert int(port) in list_container_ports("temporal")


def test_api_listens_on_published_port():
    api_environment = read_environment("api")
    port = int(api_environment["MICROUPDATES_API_PORT"])

    assert port in list_container_ports("api")
    assert api_environment.get("MICROUPDATES_API_HOST") == "0.0.0.0", (
        "the default 127.0.0.1 is unreachable from outside the container"
    )
    healthcheck = " ".join(map(str, SERVICES["api"]["healthcheck"]["test"]))
    assert f":{port}/healthz" in healthcheck


@pytest.mark.parametrize(
    ("service", "dependency"),
    [("api", "temporal"), ("worker", "temporal"), ("temporal", "postgresql"), ("temporal-ui", "temporal")],
)
def test_service_waits_for_healthy_dependency(service: str, dependency: str):
    assert read_dependency_condition(service, dependency) == "service_healthy"


@pytest.mark.parametrize("service", REQUIRED_SERVICES)
def test_service_has_restart_policy(service: str):
    assert SERVICES[service].get("restart") in ("always", "unless-stopped", "on-failure")


@pytest.mark.parametrize("service", HEALTHCHECKED_SERVICES)
def test_service_has_healthcheck(service: str):
    assert SERVICES[service].get("healthcheck", {}).get("test")


def test_temporal_uses_postgresql_service():
    temporal = read_environment("temporal")
    postgresql = read_environment("postgresql")

    assert temporal["POSTGRES_SEEDS"] == "postgresql"
    assert temporal["POSTGRES_USER"] == postgresql["POSTGRES_USER"]
    assert temporal["POSTGRES_PWD"] == postgresql["POSTGRES_PASSWORD"]


def test_database_url_is_created_by_init_script():
    url = make_url(read_environment("api")["MICROUPDATES_DATABASE_URL"])
    script = POSTGRES_INIT_SQL.read_text(encoding="utf-8")

    assert url.host == "postgresql"
    assert url.port in (None, 5432)
    user = re.search(r"CREATE USER (\w+) WITH PASSWORD '([^']*)'", script, re.IGNORECASE)
    assert user is not None, "postgres-init.sql creates no user"
    assert (url.username, url.password) == user.groups()
    assert re.search(rf"CREATE DATABASE {url.database} OWNER {url.username}\b", script, re.IGNORECASE)


def test_init_script_is_mounted_into_postgresql():
    mounts = [str(volume) for volume in SERVICES["postgresql"].get("volumes", [])]

    assert any(mount.startswith("./deploy/postgres-init.sql:/docker-entrypoint-initdb.d/") for mount in mounts)


@pytest.mark.parametrize("service", sorted(APP_SERVICES))
def test_artifact_directory_is_a_volume(service: str):
    """API processes must share the artifact directory: an upload and a download may reach different replicas."""

    artifact_dir = read_environment(service)["MICROUPDATES_ARTIFACT_DIR"]
    targets = [str(volume).split(":")[1] for volume in SERVICES[service].get("volumes", []) if ":" in str(volume)]

    assert artifact_dir in targets
