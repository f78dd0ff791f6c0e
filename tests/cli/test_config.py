"""Where the CLI finds the server and the API key: --server, then the environment, then the config file.

These tests need no stack. Each source points at a different closed loopback
port, and the connection error names the address that was used.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from microupdates.cli.config import DEFAULT_SERVER, resolve_connection_settings
from microupdates.cli.stack import free_port
from tests.cli.conftest import invoke, isolated_environment


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def three_addresses() -> tuple[str, str, str]:
    addresses = set()
    while len(addresses) < 3:
        addresses.add(closed_port_url())
    flag, env, file = sorted(addresses)
    return flag, env, file


def write_config(config_home, text: str):
    path = config_home / "microupdates" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_server_flag_wins_over_env_and_config_file(config_home, three_addresses):
    flag, env, file = three_addresses
    write_config(config_home, f"server: {file}\n")

    result = invoke(["devices", "list", "--server", flag],
                    isolated_environment(config_home, MICROUPDATES_SERVER=env))

    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: Cannot reach the API at {flag} (set by --server): ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_server_env_wins_over_config_file(config_home, three_addresses):
    _, env, file = three_addresses
    write_config(config_home, f"server: {file}\n")

    result = invoke(["devices", "list"], isolated_environment(config_home, MICROUPDATES_SERVER=env))

    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: Cannot reach the API at {env} (set by MICROUPDATES_SERVER): ")


def test_config_file_server_used_last(config_home, three_addresses):
    _, _, file = three_addresses
    path = write_config(config_home, f"server: {file}\n")

    result = invoke(["deployments", "list"], isolated_environment(config_home))

    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: Cannot reach the API at {file} (set by the config file {path}): ")


def test_config_path_comes_from_microupdates_config(config_home, tmp_path, three_addresses):
    _, _, file = three_addresses
    path = tmp_path / "elsewhere.yaml"
    path.write_text(f"server: {file}\n")

    result = invoke(["updates", "list"], isolated_environment(config_home, MICROUPDATES_CONFIG=str(path)))

    assert result.exit_code == 1
    assert f"Cannot reach the API at {file} (set by the config file {path})" in result.stderr


def test_missing_config_named_by_env_is_an_error(config_home, tmp_path):
    path = tmp_path / "missing.yaml"

    result = invoke(["devices", "list"], isolated_environment(config_home, MICROUPDATES_CONFIG=str(path)))

    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: The config file {path} named by MICROUPDATES_CONFIG does not exist."


def test_config_file_with_unknown_key_is_rejected(config_home):
    path = write_config(config_home, "sever: http://127.0.0.1:1\n")

    result = invoke(["devices", "list"], isolated_environment(config_home))

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: The config file {path} has unknown keys sever; the known keys are server, api_key, ca_file."
    )


def test_missing_ca_file_in_config_is_rejected(config_home):
    path = write_config(config_home, "ca_file: /nonexistent/ca.pem\n")

    result = invoke(["devices", "list"], isolated_environment(config_home))

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: The CA bundle /nonexistent/ca.pem from the config file {path} does not exist; "
        "give the path of a PEM file."
    )


def test_ca_file_option_wins_over_environment(config_home, tmp_path):
    option_file = tmp_path / "option.pem"
    option_file.write_text("")

    settings = resolve_connection_settings(
        None, {"XDG_CONFIG_HOME": str(config_home), "MICROUPDATES_CA_FILE": "/nonexistent/env.pem"},
        ca_file_option=str(option_file),
    )

    assert settings.ca_file == str(option_file)


def test_server_without_scheme_is_rejected(config_home):
    result = invoke(["devices", "list", "--server", "127.0.0.1:8080"], isolated_environment(config_home))

    assert result.exit_code == 1
    assert "Invalid server address '127.0.0.1:8080' from --server" in result.stderr


def test_default_server_when_nothing_is_set(tmp_path):
    settings = resolve_connection_settings(None, {"XDG_CONFIG_HOME": str(tmp_path)})

    assert settings.server == DEFAULT_SERVER
    assert settings.server_source == "the default"
    assert settings.api_key is None


class HeaderRecorder(BaseHTTPRequestHandler):
    """Respond to every GET with an empty JSON list and record each request's Authorization header."""

    authorizations: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.authorizations.append(self.headers.get("Authorization"))
        body = json.dumps([]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[str | None]]]:
    HeaderRecorder.authorizations = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeaderRecorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", HeaderRecorder.authorizations
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_api_key_env_is_sent_as_bearer_token(config_home, recording_server):
    url, authorizations = recording_server
    write_config(config_home, "api_key: from-file\n")

    result = invoke(["updates", "list"],
                    isolated_environment(config_home, MICROUPDATES_SERVER=url, MICROUPDATES_API_KEY="from-env"))

    assert result.exit_code == 0, result.output
    assert authorizations == ["Bearer from-env"]


def test_config_file_api_key_sent_and_warned(config_home, recording_server):
    url, authorizations = recording_server
    path = write_config(config_home, f"server: {url}\napi_key: from-file\n")
    path.chmod(0o644)

    result = invoke(["updates", "list"], isolated_environment(config_home))

    assert result.exit_code == 0, result.output
    assert authorizations == ["Bearer from-file"]
    assert f"contains an API key and other users may read it; run `chmod 600 {path}`" in result.stderr


def test_no_api_key_sends_no_authorization(config_home, recording_server):
    url, authorizations = recording_server

    result = invoke(["devices", "list"], isolated_environment(config_home, MICROUPDATES_SERVER=url))

    assert result.exit_code == 0, result.output
    assert authorizations == [None]
    assert result.stdout.strip() == "No devices are registered."


def test_api_key_flag_wins_over_env_and_config_file(config_home, recording_server):
    url, authorizations = recording_server
    write_config(config_home, "api_key: from-file\n")

    result = invoke(["--api-key", "from-flag", "updates", "list"],
                    isolated_environment(config_home, MICROUPDATES_SERVER=url, MICROUPDATES_API_KEY="from-env"))

    assert result.exit_code == 0, result.output
    assert authorizations == ["Bearer from-flag"]
