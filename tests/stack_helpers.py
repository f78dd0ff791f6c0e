"""Helpers for tests that use the real stack: write recipe files and wait for deployments."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from microupdates.cli.api_client import OperatorApiClient
from microupdates.cli.stack import Stack
from microupdates.workflows.contracts import FINAL_DEPLOYMENT_STATUSES

DEPLOYMENT_WAIT_SECONDS = 300.0


def write_recipe(directory: Path, recipe: dict, files: dict[str, bytes] | None = None) -> Path:
    """Write a recipe and its source files into a directory and return the recipe's path."""

    directory.mkdir(parents=True, exist_ok=True)
    for relative, content in (files or {}).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    recipe_path = directory / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    return recipe_path


def operator_headers(stack: Stack, api_key: str | None = None) -> dict[str, str]:
    """Return the Authorization header for raw HTTP requests to the operator API: the stack's admin key by default."""

    return {"Authorization": f"Bearer {api_key or stack.admin_api_key}"}


def wait_for_deployment(api: OperatorApiClient, deployment_id: str, timeout: float = DEPLOYMENT_WAIT_SECONDS) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = api.read_deployment(deployment_id)
        if detail["status"] in FINAL_DEPLOYMENT_STATUSES:
            return detail
        time.sleep(0.3)
    raise AssertionError(f"deployment {deployment_id} did not finish within {timeout} s: {detail}")
