"""Logging set-up for the server processes and the CLI."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    level = os.environ.get("MICROUPDATES_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
