"""The API process: serves the operator and device APIs with uvicorn."""

from __future__ import annotations

import uvicorn

from microupdates.api.app import create_app
from microupdates.logs import configure_logging
from microupdates.settings import ServerSettings


def main() -> None:
    settings = ServerSettings()
    configure_logging(settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        timeout_keep_alive=75,
        # Long polls would otherwise hold a shutdown for up to a minute.
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
