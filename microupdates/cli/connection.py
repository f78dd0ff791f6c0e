"""Open an API client for one command and turn its errors into one red sentence and exit code 1."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NoReturn

import typer

from microupdates.cli.api_client import OperatorApiClient, OperatorApiConnectionError, OperatorApiError
from microupdates.cli.config import API_KEY_ENV, ConfigError, ConnectionSettings, resolve_connection_settings
from microupdates.cli.output import EXIT_ERROR, fail, print_error, print_warning
from microupdates.recipe_files import RecipeError

logger = logging.getLogger(__name__)

HTTP_UNAUTHORIZED = 401
# The top-level --api-key and --ca-file options of the running command; the root callback sets them on every
# invocation, None when an option is absent.
api_key_option: ContextVar[str | None] = ContextVar("api_key_option", default=None)
ca_file_option: ContextVar[str | None] = ContextVar("ca_file_option", default=None)


def load_settings(server_option: str | None) -> ConnectionSettings:
    """Resolve the server address, API key and CA bundle, or fail with the config problem."""

    try:
        settings = resolve_connection_settings(
            server_option, api_key_option=api_key_option.get(), ca_file_option=ca_file_option.get()
        )
    except ConfigError as error:
        fail(str(error))
    if settings.warning:
        print_warning(settings.warning)
    logger.debug("Using the API at %s (from %s)", settings.server, settings.server_source)
    return settings


def describe_api_error(error: OperatorApiError, settings: ConnectionSettings) -> str:
    if isinstance(error, OperatorApiConnectionError):
        return f"Cannot reach the API at {settings.server} (set by {settings.server_source}): {error.reason}."
    if error.status_code == HTTP_UNAUTHORIZED:
        if settings.api_key is None:
            return f"{error} Give an API key with --api-key, {API_KEY_ENV} or `api_key:` in the config file."
        return f"{error} (API key from {settings.api_key_source})"
    return str(error)


@contextmanager
def operator_api(server_option: str | None) -> Iterator[OperatorApiClient]:
    """Yield a client for the resolved server; an API, connection or recipe error ends the command with exit code 1."""

    settings = load_settings(server_option)
    try:
        with OperatorApiClient(settings.server, settings.api_key, settings.ca_file) as api:
            yield api
    except OperatorApiError as error:
        fail(describe_api_error(error, settings))
    except RecipeError as error:
        fail_with_recipe_problems(error)


def fail_with_recipe_problems(error: RecipeError) -> NoReturn:
    """Print each problem of an invalid recipe on its own line and exit with code 1."""

    for problem in error.problems:
        print_error(problem)
    raise typer.Exit(EXIT_ERROR)
