"""Agent settings for TLS and job signatures: a bad CA bundle or server key stops the agent with the setting's name."""

from __future__ import annotations

import ssl

import pytest

from microupdates.device_agent.config import AgentConfigError, load_config


def test_missing_ca_file_rejected(tmp_path):
    config = load_config(None, {"server_url": "https://server", "ca_file": tmp_path / "missing.pem"})

    with pytest.raises(AgentConfigError, match="ca_file: cannot load the CA bundle .*missing.pem"):
        config.tls_verification()


def test_ca_file_without_certificates_rejected(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")
    config = load_config(None, {"server_url": "https://server", "ca_file": path})

    with pytest.raises(AgentConfigError, match="give a PEM file of CA certificates"):
        config.tls_verification()


def test_no_ca_file_uses_system_cas():
    config = load_config(None, {"server_url": "https://server"})

    assert config.tls_verification() is True


def test_invalid_server_public_key_rejected():
    with pytest.raises(AgentConfigError, match="server_public_key: .*decodes to 3 bytes; an Ed25519 key has 32"):
        load_config(None, {"server_url": "https://server", "server_public_key": "YWJj"})


def test_ssl_context_for_valid_bundle(tmp_path):
    # The system bundle that the ssl module would use anyway is a valid PEM CA bundle.
    system_bundle = ssl.get_default_verify_paths().cafile
    if system_bundle is None:
        pytest.skip("this system's OpenSSL has no default CA file")
    config = load_config(None, {"server_url": "https://server", "ca_file": system_bundle})

    assert isinstance(config.tls_verification(), ssl.SSLContext)
