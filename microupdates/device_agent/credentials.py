"""The device token: which one to use, rotating it when it is old, and falling back when the server rejects it."""

from __future__ import annotations

import logging
import time
from typing import Optional

from microupdates.device_agent.client import DeviceApiClient, DeviceApiError
from microupdates.device_agent.config import AgentConfig

logger = logging.getLogger(__name__)


class DeviceCredentials:
    """Chooses and rotates the token that `client` sends.

    The token in the credentials file wins over `device_token` from the
    settings, because a rotated token is only ever written there. When the
    server rejects it, the configured token is tried next, which is how an
    operator's newly issued token takes effect.
    """

    def __init__(self, config: AgentConfig, client: DeviceApiClient) -> None:
        self.config = config
        self.client = client
        self._device_id: Optional[str] = None
        self._next_rotation_at = 0.0

    def load(self) -> Optional[str]:
        """Set the client's token from the credentials file or the settings and return it; None when neither has one."""

        saved = self.config.load_credentials()
        if saved is not None:
            self._device_id = saved.get("device_id")
            self._use(saved["device_token"], saved.get("saved_at") or time.time())
            return saved["device_token"]
        if self.config.device_token is None:
            return None
        if self.config.token_rotation_seconds:
            # The file records the token's age, which rotation needs.
            self.config.save_token(None, self.config.device_token)
        self._use(self.config.device_token, time.time())
        return self.config.device_token

    def save_enrolled(self, device_id: str, token: str) -> None:
        self.config.save_token(device_id, token)
        self._device_id = device_id
        self._use(token, time.time())

    def fall_back_after_rejection(self) -> bool:
        """Switch to the configured token after a 401 on another one; False when there is nothing else to try."""

        configured = self.config.device_token
        if configured is None or configured == self.client.device_token:
            return False
        logger.warning("The server rejected the saved device token; using the configured device_token instead")
        try:
            self.config.save_token(self._device_id, configured)
        except OSError as error:
            # The token still works from memory; the next start falls back again.
            logger.error("Could not save the device token to %s (%s)", self.config.credentials_path(), error)
        self._use(configured, time.time())
        return True

    def rotate_if_due(self) -> None:
        """Replace the token by a new one from the server once it is `token_rotation_seconds` old.

        The server keeps the old token valid until the new one is first used,
        so a failure anywhere before the new token is saved leaves the agent
        with a token that still works, and it tries again later.
        """

        if not self.config.token_rotation_seconds or time.time() < self._next_rotation_at:
            return
        try:
            token = self.client.rotate_token()
        except DeviceApiError as error:
            logger.warning("Rotating the device token failed (%s); keeping the current one", error)
            self._next_rotation_at = time.time() + self.config.retry_max_seconds
            return
        try:
            self.config.save_token(self._device_id, token)
        except OSError as error:
            logger.error("Could not save the rotated device token to %s (%s); keeping the current one",
                         self.config.credentials_path(), error)
            self._next_rotation_at = time.time() + self.config.retry_max_seconds
            return
        self._use(token, time.time())
        logger.info("Rotated the device token; the new one is saved in %s", self.config.credentials_path())

    def _use(self, token: str, saved_at: float) -> None:
        self.client.device_token = token
        self._next_rotation_at = saved_at + self.config.token_rotation_seconds
