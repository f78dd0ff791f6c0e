"""The FastAPI application: operator API under /api/v1, device API under /device/v1."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse

from microupdates import __version__
from microupdates.api.auth import (
    OPERATOR_API_PREFIX,
    assign_operator_roles,
    authorize_operator,
    find_unguarded_operator_routes,
)
from microupdates.api.deployment_starts import LostStartReconciler
from microupdates.api.deps import ApiState
from microupdates.api.device_jobs import DeviceJobs
from microupdates.api.job_notifier import JobNotifier
from microupdates.api.job_signing import JobSigner
from microupdates.api.metrics import ApiMetrics, TemporalCallCounter
from microupdates.api.routes import api_keys, deployments, device_agent, devices, secrets, updates
from microupdates.artifact_store import ArtifactStore
from microupdates.db.session import Database
from microupdates.errors import ConflictError, EnrolmentKeyRejectedError, InvalidRequestError, NotFoundError
from microupdates.protocol.device_api import DEVICE_API_PREFIX
from microupdates.settings import ServerSettings
from microupdates.temporal_client import connect_temporal

logger = logging.getLogger(__name__)


def create_app(settings: ServerSettings) -> FastAPI:
    metrics = ApiMetrics()
    # Loaded (or created) before the app starts, so a bad key file stops the process with its message.
    signer = JobSigner.from_key_file(settings.resolved_signing_key_file())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        database = Database(settings.resolved_database_url())
        database.create_schema()
        temporal = await connect_temporal(settings, interceptors=[TemporalCallCounter(metrics)])
        notifier = JobNotifier(database)
        await notifier.start()
        reconciler = LostStartReconciler(database, temporal, settings.task_queue,
                                         settings.lost_start_check_seconds, settings.lost_start_check_seconds)
        reconciler.start()
        metrics.watch_long_polls(notifier)
        app.state.api = ApiState(
            settings=settings,
            database=database,
            temporal=temporal,
            notifier=notifier,
            device_jobs=DeviceJobs(database, temporal, notifier, signer),
            artifacts=ArtifactStore(settings.resolved_artifact_dir()),
            metrics=metrics,
            signer=signer,
        )
        logger.info("API ready; Temporal at %s, task queue %s, job-signing public key %s",
                    settings.temporal_address, settings.task_queue, signer.public_key_text)
        yield
        await reconciler.stop()
        await notifier.stop()
        database.dispose()

    app = FastAPI(
        title="microupdates",
        version=__version__,
        description="Ship application updates to fleets of Linux edge devices.",
        lifespan=lifespan,
    )
    # Every operator route needs an API key whose role covers the route's entry in OPERATOR_ROUTE_ROLES.
    for router in (devices.router, updates.router, deployments.router, secrets.router, api_keys.router):
        assign_operator_roles(router)
        app.include_router(router, prefix=OPERATOR_API_PREFIX, dependencies=[Security(authorize_operator)])
    app.include_router(device_agent.router, prefix=DEVICE_API_PREFIX)
    unguarded = find_unguarded_operator_routes(app)
    if unguarded:
        raise RuntimeError(f"Operator routes without authorize_operator or a role: {', '.join(unguarded)}.")
    register_error_handlers(app)
    metrics.install(app)

    @app.get("/healthz", tags=["health"])
    def read_health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def register_error_handlers(app: FastAPI) -> None:
    statuses = {NotFoundError: 404, ConflictError: 409, InvalidRequestError: 422}
    for error_type, status_code in statuses.items():

        def handle(request: Request, error: Exception, status_code: int = status_code) -> JSONResponse:
            return JSONResponse(status_code=status_code, content={"detail": str(error)})

        app.add_exception_handler(error_type, handle)

    def handle_enrolment_key(request: Request, error: EnrolmentKeyRejectedError) -> JSONResponse:
        return JSONResponse(status_code=error.status_code, content={"detail": str(error)})

    app.add_exception_handler(EnrolmentKeyRejectedError, handle_enrolment_key)
