"""Agent settings from a YAML or JSON file, overridden by command-line flags."""

from __future__ import annotations

import json
import os
import ssl
import time
from pathlib import Path
from typing import List, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from microupdates.device_agent.job_verification import ServerKeyError, decode_public_key
from microupdates.protocol.device_api import DEFAULT_LONG_POLL_SECONDS, MAX_LONG_POLL_SECONDS

CREDENTIALS_FILE = "credentials.json"
DEFAULT_STATE_DIR = "/var/lib/microupdates-agent"
DEFAULT_REBOOT_COMMAND = ["systemctl", "reboot"]
DEFAULT_TOKEN_ROTATION_SECONDS = 30 * 86400
# Variables copied from the agent's environment into every stage, when set:
# proxies and CA bundles that package managers need behind a corporate proxy.
DEFAULT_PASS_ENVIRONMENT = [
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
    "PIP_CERT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_DEFAULT_TIMEOUT",
    "NPM_CONFIG_REGISTRY", "npm_config_registry",
]


class AgentConfigError(Exception):
    """Raised when the configuration file or flags are invalid; the message names the setting."""


class AgentConfig(BaseModel):
    """Settings of one agent; `device_root` is for simulated devices and stays unset on real ones."""

    model_config = ConfigDict(extra="forbid")

    server_url: str
    device_token: Optional[str] = None
    enrolment_key: Optional[str] = None
    device_name: Optional[str] = None
    tags: List[str] = Field(default_factory=list)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    device_root: Optional[Path] = None
    long_poll_seconds: int = Field(default=DEFAULT_LONG_POLL_SECONDS, ge=0, le=MAX_LONG_POLL_SECONDS)
    retry_max_seconds: float = Field(default=30.0, gt=0, le=3600)
    # CA bundle (PEM) that verifies the server's TLS certificate; unset uses the system's CAs.
    ca_file: Optional[Path] = None
    # The server's job-signing public key, base64 of the 32 raw bytes (the API logs it at start).
    # Unset, the agent pins the key the server presents at enrolment, or at its first start with a token.
    server_public_key: Optional[str] = None
    reboot_command: List[str] = Field(default_factory=lambda: list(DEFAULT_REBOOT_COMMAND), min_length=1)
    # Simulated devices (tests, the demo) restart the agent process instead of rebooting the host.
    restart_instead_of_reboot: bool = False
    pass_environment: List[str] = Field(default_factory=lambda: list(DEFAULT_PASS_ENVIRONMENT))
    # The agent asks for a new device token when the one in the credentials file is this old; 0 turns it off.
    token_rotation_seconds: int = Field(default=DEFAULT_TOKEN_ROTATION_SECONDS, ge=0)

    @field_validator("server_url")
    @classmethod
    def check_server_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, got %r" % value)
        return value.rstrip("/")

    @field_validator("server_public_key")
    @classmethod
    def check_server_public_key(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                decode_public_key(value)
            except ServerKeyError as error:
                raise ValueError(str(error)) from error
        return value

    def tls_verification(self) -> Union[ssl.SSLContext, bool]:
        """Return what httpx verifies the server's certificate with: the pinned CA bundle, or True for the system's CAs."""

        if self.ca_file is None:
            return True
        try:
            return ssl.create_default_context(cafile=str(self.ca_file))
        except (OSError, ssl.SSLError) as error:
            raise AgentConfigError(
                "ca_file: cannot load the CA bundle %s: %s; give a PEM file of CA certificates" % (self.ca_file, error)
            ) from error

    @field_validator("device_root")
    @classmethod
    def check_device_root(cls, value: Optional[Path]) -> Optional[Path]:
        if value is not None and not value.is_absolute():
            value = value.resolve()
        return value

    def credentials_path(self) -> Path:
        return self.state_dir / CREDENTIALS_FILE

    def load_credentials(self) -> Optional[dict]:
        """Return the saved credentials: `device_token`, and `device_id` and `saved_at` (Unix time) when known."""

        try:
            with open(self.credentials_path(), "r", encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def save_token(self, device_id: Optional[str], token: str) -> None:
        """Replace the credentials file atomically: write a new file, fsync it, rename it over the old one."""

        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.credentials_path()
        temporary = path.with_name(path.name + ".tmp")
        descriptor = os.open(str(temporary), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump({"device_id": device_id, "device_token": token, "saved_at": time.time()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(self.state_dir)


def fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable across a power loss."""

    descriptor = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_config(path: Optional[Path], overrides: dict) -> AgentConfig:
    """Merge the file (if any) with flag values that are not None, and validate the result."""

    values = {}
    if path is not None:
        try:
            with open(path, "r", encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
        except OSError as error:
            raise AgentConfigError("cannot read the config file %s: %s" % (path, error)) from error
        except yaml.YAMLError as error:
            raise AgentConfigError("the config file %s is not valid YAML: %s" % (path, error)) from error
        if not isinstance(loaded, dict):
            raise AgentConfigError("the config file %s must hold a mapping of settings" % path)
        values.update(loaded)

    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return AgentConfig.model_validate(values)
    except ValidationError as error:
        problems = ["%s: %s" % (".".join(str(p) for p in e["loc"]) or "config", e["msg"]) for e in error.errors()]
        raise AgentConfigError("invalid agent settings:\n" + "\n".join(problems)) from error
