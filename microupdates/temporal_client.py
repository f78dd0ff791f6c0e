"""Connecting to the Temporal server with a bounded wait."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from temporalio.client import Client, Interceptor
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError

from microupdates.settings import ServerSettings

logger = logging.getLogger(__name__)

CONNECT_RETRY_SECONDS = 1.0


class TemporalUnavailableError(RuntimeError):
    """Raised when the Temporal server cannot be reached within the connect timeout."""


async def connect_temporal(
    settings: ServerSettings, runtime: Runtime | None = None, interceptors: Sequence[Interceptor] = ()
) -> Client:
    deadline = time.monotonic() + settings.temporal_connect_timeout_seconds
    while True:
        try:
            return await Client.connect(
                settings.temporal_address, namespace=settings.temporal_namespace, runtime=runtime,
                interceptors=interceptors,
            )
        except (RPCError, RuntimeError, OSError) as error:
            if time.monotonic() > deadline:
                raise TemporalUnavailableError(
                    f"Cannot reach the Temporal server at {settings.temporal_address} after "
                    f"{settings.temporal_connect_timeout_seconds:.0f} s: {error}. "
                    "Start it (microupdates-stack starts a dev server) or set MICROUPDATES_TEMPORAL_ADDRESS."
                ) from error
            logger.info("Temporal at %s not reachable yet (%s); retrying", settings.temporal_address, error)
            await asyncio.sleep(CONNECT_RETRY_SECONDS)


def metrics_runtime(bind_address: str) -> Runtime | None:
    """Return a Temporal runtime that serves the SDK's metrics for Prometheus at `bind_address`, or None."""

    if not bind_address:
        return None
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=bind_address)))
