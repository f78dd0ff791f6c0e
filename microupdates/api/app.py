"""The FastAPI application: operator API under /api/v1, device API under /device/v1."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Security
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from microupdates import __version__
from microupdates.api.auth import (
    OPERATOR_API_PREFIX,
    assign_operator_roles,
    authorize_operator,
    find_unguarded_operator_routes,
)
from microupdates.api.body_limits import BodySizeLimit
from microupdates.api.deployment_starts import LostStartReconciler
from microupdates.api.deps import ApiState
from microupdates.api.device_jobs import DeviceJobs
from microupdates.api.job_notifier import JobNotifier
from microupdates.api.job_signing import JobSigner
from microupdates.api.metrics import ApiMetrics, TemporalCallCounter
from microupdates.api.responses import DEVICE_ERROR_RESPONSES, OPERATOR_ERROR_RESPONSES
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
            artifacts=ArtifactStore(settings.resolved_artifact_dir(), settings.max_artifact_bytes),
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
        app.include_router(
            router,
            prefix=OPERATOR_API_PREFIX,
            dependencies=[Security(authorize_operator)],
            responses=OPERATOR_ERROR_RESPONSES,
        )
    app.include_router(device_agent.router, prefix=DEVICE_API_PREFIX, responses=DEVICE_ERROR_RESPONSES)
    unguarded = find_unguarded_operator_routes(app)
    if unguarded:
        raise RuntimeError(f"Operator routes without authorize_operator or a role: {', '.join(unguarded)}.")
    register_error_handlers(app)
    # Added before the metrics middleware, so it wraps the route directly and
    # its 413 raised inside a body read reaches the HTTPException handler.
    app.add_middleware(BodySizeLimit, limit_for=lambda path: body_limit_for(settings, path))
    metrics.install(app)

    @app.get("/healthz", tags=["health"])
    def read_health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def body_limit_for(settings: ServerSettings, path: str) -> tuple[int, str]:
    """Return the body limit of a request path and the name of the setting behind it."""

    if path == f"{OPERATOR_API_PREFIX}/artifacts":
        return settings.max_artifact_bytes, "max_artifact_bytes"
    return settings.max_request_body_bytes, "max_request_body_bytes"


def register_error_handlers(app: FastAPI) -> None:
    statuses = {NotFoundError: 404, ConflictError: 409, InvalidRequestError: 422}
    for error_type, status_code in statuses.items():

        def handle(request: Request, error: Exception, status_code: int = status_code) -> JSONResponse:
            return JSONResponse(status_code=status_code, content={"detail": str(error)})

        app.add_exception_handler(error_type, handle)

    def handle_enrolment_key(request: Request, error: EnrolmentKeyRejectedError) -> JSONResponse:
        return JSONResponse(status_code=error.status_code, content={"detail": str(error)})

    app.add_exception_handler(EnrolmentKeyRejectedError, handle_enrolment_key)

    async def handle_http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 405:
            # Starlette's 405 lists only the methods of the first route with this
            # path, but GET and POST on one path are separate routes here.
            allowed = allowed_methods(app, request)
            return JSONResponse({"detail": error.detail}, status_code=405, headers={"Allow": ", ".join(allowed)})
        return await http_exception_handler(request, error)

    app.add_exception_handler(StarletteHTTPException, handle_http_error)


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Return the methods that the OpenAPI schema lists for the request's path, sorted."""

    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        pattern, _, _ = compile_path(template)
        if pattern.match(request.url.path):
            methods.update(method.upper() for method in operations)
    return sorted(methods)
