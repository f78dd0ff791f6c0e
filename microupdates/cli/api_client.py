"""HTTP client of the operator API, used by the CLI and the demo."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from microupdates.recipe_files import bundle_recipe, load_recipe_file

logger = logging.getLogger(__name__)

OPERATOR_API_PREFIX = "/api/v1"
REQUEST_TIMEOUT_SECONDS = 60.0

# The API's maximum page sizes for GET /devices and GET /deployments/{id}.
DEVICE_PAGE_SIZE = 1000
DEPLOYMENT_DEVICE_PAGE_SIZE = 1000

MAX_ERROR_BODY_CHARS = 500


class OperatorApiError(Exception):
    """Raised when the API returns an error status; the message contains the API's own sentence.

    `status_code` is the HTTP status, or None when no response arrived.
    """

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class OperatorApiConnectionError(OperatorApiError):
    """Raised when the API cannot be reached or does not respond in time."""

    def __init__(self, server_url: str, reason: str) -> None:
        super().__init__(f"Cannot reach the API at {server_url}: {reason}")
        self.server_url = server_url
        self.reason = reason


class OperatorApiClient:
    """Synchronous client of `/api/v1`; every method returns the decoded JSON body."""

    def __init__(self, server_url: str, api_key: str | None = None, ca_file: str | None = None) -> None:
        """`ca_file` is a PEM bundle that verifies the server's TLS certificate; None uses the system's CAs."""

        self.server_url = server_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.server_url + OPERATOR_API_PREFIX, timeout=REQUEST_TIMEOUT_SECONDS, headers=headers,
            verify=ssl.create_default_context(cafile=ca_file) if ca_file else True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OperatorApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def register_device(self, name: str, groups: list[str], tags: list[str] | None = None) -> dict[str, Any]:
        return self._request("POST", "/devices", json={"name": name, "groups": groups, "tags": tags or []})

    def list_devices(self, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return self._request("GET", "/devices", params=params)

    def iter_devices(self) -> Iterator[dict[str, Any]]:
        """Yield every registered device in id order, one API page at a time."""

        after = None
        while True:
            page = self.list_devices(DEVICE_PAGE_SIZE, after)
            yield from page
            if len(page) < DEVICE_PAGE_SIZE:
                return
            after = page[-1]["id"]

    def read_device(self, device_id: str) -> dict[str, Any]:
        return self._request("GET", f"/devices/{device_id}")

    def set_device_labels(
        self, device_id: str, groups: list[str] | None = None, tags: list[str] | None = None
    ) -> dict[str, Any]:
        """Replace a device's groups, tags or both; None leaves that list as it is."""

        body: dict[str, Any] = {}
        if groups is not None:
            body["groups"] = groups
        if tags is not None:
            body["tags"] = tags
        return self._request("PATCH", f"/devices/{device_id}", json=body)

    def create_enrolment_key(
        self, group: str, tags: list[str] | None = None, max_uses: int | None = None,
        expires_in_seconds: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"group": group, "tags": tags or []}
        if max_uses is not None:
            body["max_uses"] = max_uses
        if expires_in_seconds is not None:
            body["expires_in_seconds"] = expires_in_seconds
        return self._request("POST", "/enrolment-keys", json=body)

    def list_enrolment_keys(self) -> list[dict[str, Any]]:
        return self._request("GET", "/enrolment-keys")

    def revoke_enrolment_key(self, key_id: int) -> dict[str, Any]:
        return self._request("POST", f"/enrolment-keys/{key_id}/revoke")

    def issue_device_token(self, device_id: str) -> dict[str, Any]:
        return self._request("POST", f"/devices/{device_id}/token")

    def revoke_device_token(self, device_id: str) -> dict[str, Any]:
        return self._request("POST", f"/devices/{device_id}/token/revoke")

    def set_secret(self, name: str, value: str) -> None:
        self._request("PUT", f"/secrets/{name}", json={"value": value})

    def list_secrets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/secrets")

    def delete_secret(self, name: str) -> None:
        self._request("DELETE", f"/secrets/{name}")

    def remove_device(self, device_id: str) -> None:
        self._request("DELETE", f"/devices/{device_id}")

    def upload_artifact(self, content: bytes) -> str:
        return self._request("POST", "/artifacts", content=content)["sha256"]

    def create_update_from_file(self, recipe_path: Path) -> dict[str, Any]:
        """Validate a recipe file, upload its files and store it as an update.

        Raises RecipeError when the file is invalid, before anything is uploaded.
        """

        loaded = load_recipe_file(recipe_path)
        recipe = bundle_recipe(loaded, self.upload_artifact)
        return self._request("POST", "/updates", json={"recipe": recipe.model_dump(mode="json", exclude_none=True)})

    def list_updates(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._request("GET", "/updates", params={"limit": limit})

    def read_update(self, update_id: str) -> dict[str, Any]:
        return self._request("GET", f"/updates/{update_id}")

    def deploy(
        self,
        update_id: str,
        devices: list[str] | None = None,
        groups: list[str] | None = None,
        timeouts: dict[str, int] | None = None,
        tags: list[str] | None = None,
        rollout: dict[str, Any] | None = None,
        retries: dict[str, int] | None = None,
        check_in_deadline: str | None = None,
    ) -> dict:
        """Start a deployment; `rollout` contains the options of RolloutOptions (limits, threshold, phases)."""

        body: dict[str, Any] = {"update_id": update_id, **(rollout or {})}
        if devices or groups or tags:
            body["targets"] = {"devices": devices or [], "groups": groups or [], "tags": tags or []}
        if timeouts:
            body["timeouts"] = timeouts
        if retries:
            body["retries"] = retries
        if check_in_deadline is not None:
            body["check_in_deadline"] = check_in_deadline
        return self._request("POST", "/deployments", json=body)

    def redeploy(
        self,
        deployment_id: str,
        devices: list[str] | None = None,
        groups: list[str] | None = None,
        tags: list[str] | None = None,
        rollout: dict[str, Any] | None = None,
    ) -> dict:
        """Deploy the update of a deployment, unchanged, to other targets."""

        body: dict[str, Any] = {
            "targets": {"devices": devices or [], "groups": groups or [], "tags": tags or []},
            **(rollout or {}),
        }
        return self._request("POST", f"/deployments/{deployment_id}/redeploy", json=body)

    def control_rollout(self, deployment_id: str, action: str, phase: int | None = None) -> dict[str, Any]:
        """Pause, resume or promote a deployment; returns the workflow's answer."""

        body = {"phase": phase} if phase is not None else {}
        return self._request("POST", f"/deployments/{deployment_id}/{action}", json=body)

    def list_deployment_devices(
        self, deployment_id: str, limit: int | None = None, after: str | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {}
        if limit is not None:
            params["limit"] = limit
        if after is not None:
            params["after"] = after
        return self._request("GET", f"/deployments/{deployment_id}/devices", params=params)

    def abort(self, deployment_id: str, device_id: str | None = None) -> dict:
        path = f"/deployments/{deployment_id}/abort"
        if device_id is not None:
            path = f"/deployments/{deployment_id}/devices/{device_id}/abort"
        return self._request("POST", path)

    def list_deployments(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._request("GET", "/deployments", params={"limit": limit})

    def read_deployment(
        self, deployment_id: str, limit: int | None = None, after: str | None = None
    ) -> dict[str, Any]:
        """Return a deployment with one page of its devices (the API's default page size when `limit` is None)."""

        params: dict[str, Any] = {}
        if limit is not None:
            params["limit"] = limit
        if after is not None:
            params["after"] = after
        return self._request("GET", f"/deployments/{deployment_id}", params=params)

    def read_deployment_with_all_devices(self, deployment_id: str) -> dict[str, Any]:
        """Return a deployment with every device, reading further pages while a page comes back full.

        The summary fields (status, counts) are those of the first page's response.
        """

        detail = self.read_deployment(deployment_id, limit=DEPLOYMENT_DEVICE_PAGE_SIZE)
        page = detail["devices"]
        while len(page) == DEPLOYMENT_DEVICE_PAGE_SIZE:
            page = self.read_deployment(
                deployment_id, limit=DEPLOYMENT_DEVICE_PAGE_SIZE, after=page[-1]["device_id"]
            )["devices"]
            detail["devices"].extend(page)
        return detail

    def read_device_result(self, deployment_id: str, device_id: str) -> dict[str, Any]:
        return self._request("GET", f"/deployments/{deployment_id}/devices/{device_id}")

    def create_api_key(self, name: str, role: str) -> dict[str, Any]:
        """Create an API key; the response's `key` is the only copy of the key."""

        return self._request("POST", "/api-keys", json={"name": name, "role": role})

    def list_api_keys(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api-keys")

    def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        return self._request("POST", f"/api-keys/{key_id}/revoke")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise OperatorApiConnectionError(
                self.server_url, f"no response within {REQUEST_TIMEOUT_SECONDS:.0f} s ({type(error).__name__})"
            ) from error
        except httpx.ConnectError as error:
            reason = str(error) or type(error).__name__
            if "CERTIFICATE_VERIFY_FAILED" in reason:
                reason = (f"the server's TLS certificate was not accepted ({reason}); "
                          "pass the CA bundle that signed it with --ca-file or MICROUPDATES_CA_FILE")
            raise OperatorApiConnectionError(self.server_url, reason) from error
        except httpx.HTTPError as error:
            raise OperatorApiConnectionError(self.server_url, str(error) or type(error).__name__) from error

        logger.debug("%s %s returned HTTP %d", method, path, response.status_code)
        if response.status_code >= 400:
            detail = describe_error_body(response)
            raise OperatorApiError(
                f"{method} {path} failed with HTTP {response.status_code}: {detail}", response.status_code
            )
        return response.json() if response.content else None


def describe_error_body(response: httpx.Response) -> str:
    """Return the `detail` of a FastAPI error body as one line of text."""

    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text[:MAX_ERROR_BODY_CHARS] or response.reason_phrase

    # A request-validation error carries a list of {loc, msg}, one per rejected field.
    if isinstance(detail, list):
        return "; ".join(describe_validation_item(item) for item in detail)
    if detail is None:
        return response.reason_phrase
    return str(detail)


def describe_validation_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    location = ".".join(str(part) for part in item.get("loc", []) if part != "body")
    message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{location}: {message}" if location else message
