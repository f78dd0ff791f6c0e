"""HTTP client of the operator API, used by the CLI and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from microupdates.recipe_files import bundle_recipe, load_recipe_file

OPERATOR_API_PREFIX = "/api/v1"
REQUEST_TIMEOUT_SECONDS = 60.0


class OperatorApiError(Exception):
    """Raised when the API answers with an error; the message is the API's own sentence."""


class OperatorApiClient:
    def __init__(self, server_url: str) -> None:
        self.server_url = server_url.rstrip("/")
        self._http = httpx.Client(base_url=self.server_url + OPERATOR_API_PREFIX, timeout=REQUEST_TIMEOUT_SECONDS)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OperatorApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def register_device(self, name: str, groups: list[str], tags: list[str] | None = None) -> dict[str, Any]:
        return self._request("POST", "/devices", json={"name": name, "groups": groups, "tags": tags or []})

    def list_devices(self) -> list[dict[str, Any]]:
        return self._request("GET", "/devices")

    def upload_artifact(self, content: bytes) -> str:
        return self._request("POST", "/artifacts", content=content)["sha256"]

    def create_update_from_file(self, recipe_path: Path) -> dict[str, Any]:
        """Validate a recipe file, upload its files and store it as an update."""

        loaded = load_recipe_file(recipe_path)
        recipe = bundle_recipe(loaded, self.upload_artifact)
        return self._request("POST", "/updates", json={"recipe": recipe.model_dump(mode="json", exclude_none=True)})

    def deploy(
        self,
        update_id: str,
        devices: list[str] | None = None,
        groups: list[str] | None = None,
        timeouts: dict[str, int] | None = None,
    ) -> dict:
        body: dict[str, Any] = {"update_id": update_id}
        if devices or groups:
            body["targets"] = {"devices": devices or [], "groups": groups or []}
        if timeouts:
            body["timeouts"] = timeouts
        return self._request("POST", "/deployments", json=body)

    def abort(self, deployment_id: str, device_id: str | None = None) -> dict:
        path = f"/deployments/{deployment_id}/abort"
        if device_id is not None:
            path = f"/deployments/{deployment_id}/devices/{device_id}/abort"
        return self._request("POST", path)

    def list_deployments(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._request("GET", "/deployments", params={"limit": limit})

    def read_deployment(self, deployment_id: str) -> dict[str, Any]:
        return self._request("GET", f"/deployments/{deployment_id}")

    def read_device_result(self, deployment_id: str, device_id: str) -> dict[str, Any]:
        return self._request("GET", f"/deployments/{deployment_id}/devices/{device_id}")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise OperatorApiError(f"Cannot reach the API at {self.server_url}: {error}") from error
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            raise OperatorApiError(f"{method} {path} failed with HTTP {response.status_code}: {detail}")
        return response.json() if response.content else None
