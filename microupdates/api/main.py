"""The API process: serves the operator and device APIs with uvicorn."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from microupdates.api.app import create_app
from microupdates.api.job_signing import SigningKeyError
from microupdates.logs import configure_logging
from microupdates.settings import ServerSettings


def main() -> None:
    try:
        settings = ServerSettings()
    except ValidationError as error:
        sys.exit(f"microupdates-api: invalid settings: {error}")
    configure_logging(settings.log_format)
    try:
        app = create_app(settings)
    except SigningKeyError as error:
        sys.exit(f"microupdates-api: {error}")
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        # HTTPS when both are set; ServerSettings rejects one without the other.
        ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
        ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
        log_level="warning",
        timeout_keep_alive=75,
        # Long polls would otherwise hold a shutdown for up to a minute.
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
