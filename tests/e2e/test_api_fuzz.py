"""Fuzz the running API from its own OpenAPI schema with schemathesis.

Each operation gets a few valid and invalid requests generated from the
schema. A response fails the test when it is a 5xx or contradicts the
schema: an undeclared status code, a body or content type other than the
declared one. docs/api.md gives the command for a longer run.
"""

from __future__ import annotations


import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from microupdates.protocol.device_api import DEVICE_API_PREFIX
from tests.stack_helpers import operator_headers

# Requests per operation and generation mode. With 39 operations the test
# took 13 s on 2 cores; the timeout mark below bounds it.
EXAMPLES_PER_OPERATION = 5
# A check-in with a valid token waits up to wait_seconds (at most 60) for a job,
# so check-ins are fuzzed without a token: validation and the 401 path only.
UNAUTHENTICATED_OPERATIONS = {f"POST {DEVICE_API_PREFIX}/check-in"}
REQUEST_TIMEOUT_SECONDS = 30
# The schema cannot state every rule (name grammars, duplicates, a recipe that
# does nothing), so a schema-valid request may still get a 422 with the rule.
# Invalid requests are checked for 5xx and for responses that contradict the
# schema, but not for being rejected: the API ignores unknown query parameters,
# and the test adds the Authorization header back to a case that dropped it.
EXCLUDED_CHECKS = [positive_data_acceptance, negative_data_rejection]



def device_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def headers_for(operation_label: str, path: str, operator: dict[str, str], device: dict[str, str]) -> dict[str, str]:
    if operation_label in UNAUTHENTICATED_OPERATIONS:
        return {}
    if path.startswith(DEVICE_API_PREFIX):
        return device
    return operator


def fuzz_operation(operation, headers: dict[str, str], mode: GenerationMode, base_url: str) -> None:
    """Send EXAMPLES_PER_OPERATION generated requests and validate every response against the schema."""

    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        case.call_and_validate(
            base_url=base_url, headers=headers, excluded_checks=EXCLUDED_CHECKS, timeout=REQUEST_TIMEOUT_SECONDS
        )

    run()


@pytest.mark.timeout(90)
def test_fuzz_openapi_schema_finds_no_errors(stack, api, unique_name):
    token = api.register_device(f"fuzz-{unique_name}", groups=[f"fuzz-{unique_name}"])["token"]
    operator = operator_headers(stack)
    device = device_headers(token)
    schema = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json", headers=operator)

    failures = []
    operation_count = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operation_count += 1
        headers = headers_for(operation.label, operation.path, operator, device)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, headers, mode, stack.api_url)
            except Unsatisfiable:
                # The schema admits every value of this operation's inputs, so no invalid request exists.
                continue
            except (AssertionError, BaseExceptionGroup) as error:
                failures.append(f"{operation.label} ({mode.value}): {error}")

    assert operation_count >= 20, f"the schema lists only {operation_count} operations"
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("PUT", "/api/v1/devices", "GET, POST"),
        ("OPTIONS", "/api/v1/devices/gw-1", "DELETE, GET, PATCH"),
        ("DELETE", "/api/v1/updates", "GET, POST"),
        ("GET", "/device/v1/check-in", "POST"),
    ],
)
def test_method_not_allowed_lists_every_method(stack, api, method, path, allowed):
    response = httpx.request(method, f"{stack.api_url}{path}", headers=operator_headers(stack))

    assert response.status_code == 405
    assert response.headers["allow"] == allowed
