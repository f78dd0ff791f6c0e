"""Server address and API key for the CLI, each with the source it came from.

The address comes from the first of: the `--server` option, the
`MICROUPDATES_SERVER` environment variable, the `server` key of the config
file, and DEFAULT_SERVER. The API key comes from the `--api-key` option, then
`MICROUPDATES_API_KEY`, then the `api_key` key of the config file. The CA bundle
that verifies an https server comes from `--ca-file`, `MICROUPDATES_CA_FILE`,
then `ca_file` in the config file. An empty environment variable counts as unset.

The config file is `$MICROUPDATES_CONFIG` when set, else
`$XDG_CONFIG_HOME/microupdates/config.yaml`, else
`~/.config/microupdates/config.yaml`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_SERVER = "http://127.0.0.1:8080"
SERVER_ENV = "MICROUPDATES_SERVER"
API_KEY_ENV = "MICROUPDATES_API_KEY"
CONFIG_ENV = "MICROUPDATES_CONFIG"
CA_FILE_ENV = "MICROUPDATES_CA_FILE"
CONFIG_KEYS = ("server", "api_key", "ca_file")


class ConfigError(Exception):
    """Raised when the config file or a server address cannot be used; the message names it and the reason."""


@dataclass(frozen=True)
class ConnectionSettings:
    server: str
    server_source: str
    api_key: str | None
    api_key_source: str | None
    # Set when the config file contains an API key and other users may read it.
    warning: str | None = None
    # PEM bundle that verifies the server's TLS certificate; None uses the system's CAs.
    ca_file: str | None = None


def config_file_path(environ: Mapping[str, str]) -> Path:
    explicit = environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config_home = environ.get("XDG_CONFIG_HOME")
    base = Path(config_home) if config_home else Path.home() / ".config"
    return base / "microupdates" / "config.yaml"


def read_config_file(path: Path, required: bool) -> dict[str, str]:
    """Return the file's settings; a missing file gives {} unless `required`."""

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        if required:
            raise ConfigError(f"The config file {path} named by {CONFIG_ENV} does not exist.") from error
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Cannot read the config file {path}: {error}.") from error

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"The config file {path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"The config file {path} must be a mapping with the keys {', '.join(CONFIG_KEYS)}.")

    unknown = sorted(str(key) for key in data if key not in CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            f"The config file {path} has unknown keys {', '.join(unknown)}; the known keys are {', '.join(CONFIG_KEYS)}."
        )
    settings = {}
    for key, value in data.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"The config file {path}: {key} must be a string, got {value!r}.")
        settings[key] = value
    return settings


def check_server_url(url: str, source: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"Invalid server address {url!r} from {source}: give a URL such as {DEFAULT_SERVER}.")
    return url.rstrip("/")


def describe_readable_key(path: Path) -> str | None:
    """Return a warning when the file is readable by its group or by others, else None."""

    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"The config file {path} contains an API key and other users may read it; run `chmod 600 {path}`."
    return None


def resolve_connection_settings(
    server_option: str | None,
    environ: Mapping[str, str] | None = None,
    api_key_option: str | None = None,
    ca_file_option: str | None = None,
) -> ConnectionSettings:
    """Return the server address, API key and CA bundle from the options, the environment and the config file."""

    environ = os.environ if environ is None else environ
    path = config_file_path(environ)
    file_settings = read_config_file(path, required=bool(environ.get(CONFIG_ENV)))
    file_source = f"the config file {path}"

    if server_option:
        server, server_source = server_option, "--server"
    elif environ.get(SERVER_ENV):
        server, server_source = environ[SERVER_ENV], SERVER_ENV
    elif file_settings.get("server"):
        server, server_source = file_settings["server"], file_source
    else:
        server, server_source = DEFAULT_SERVER, "the default"

    api_key, api_key_source, warning = None, None, None
    if api_key_option:
        api_key, api_key_source = api_key_option, "--api-key"
    elif environ.get(API_KEY_ENV):
        api_key, api_key_source = environ[API_KEY_ENV], API_KEY_ENV
    elif file_settings.get("api_key"):
        api_key, api_key_source = file_settings["api_key"], file_source
        warning = describe_readable_key(path)

    ca_file, ca_file_source = None, None
    if ca_file_option:
        ca_file, ca_file_source = ca_file_option, "--ca-file"
    elif environ.get(CA_FILE_ENV):
        ca_file, ca_file_source = environ[CA_FILE_ENV], CA_FILE_ENV
    elif file_settings.get("ca_file"):
        ca_file, ca_file_source = file_settings["ca_file"], file_source
    if ca_file is not None and not Path(ca_file).expanduser().is_file():
        raise ConfigError(f"The CA bundle {ca_file} from {ca_file_source} does not exist; give the path of a PEM file.")

    return ConnectionSettings(
        server=check_server_url(server, server_source),
        server_source=server_source,
        api_key=api_key,
        api_key_source=api_key_source,
        warning=warning,
        ca_file=str(Path(ca_file).expanduser()) if ca_file else None,
    )
