"""Prometheus metrics of the API process, served at /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio import client as temporal_client

from microupdates.api.job_notifier import JobNotifier


class ApiMetrics:
    """The API's own metrics, in a registry per application so tests can run several apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "microupdates_api_requests_total", "HTTP requests served, by route, method and status code.",
            ["route", "method", "status"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "microupdates_api_request_duration_seconds", "Time to serve a request, long polls included.",
            ["route", "method"], registry=self.registry,
        )
        self.check_ins = Counter(
            "microupdates_device_check_ins_total", "Device check-ins, by whether they returned a job.",
            ["outcome"], registry=self.registry,
        )
        self.long_polls = Gauge(
            "microupdates_long_polls_held", "Check-ins and progress reports waiting in this process right now.",
            registry=self.registry,
        )
        self.temporal_calls = Counter(
            "microupdates_api_temporal_calls_total", "Calls of this process's Temporal client, by call.",
            ["call"], registry=self.registry,
        )

    def watch_long_polls(self, notifier: JobNotifier) -> None:
        self.long_polls.set_function(lambda: notifier.waiting_count)

    def install(self, app: FastAPI) -> None:
        app.add_middleware(RequestMetrics, metrics=self)

        @app.get("/metrics", include_in_schema=False)
        def read_metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """ASGI middleware that counts and times every HTTP request by route template, method and status.

    It is a plain ASGI middleware because Starlette's `BaseHTTPMiddleware`
    runs the route in a separate task and copies each response through a
    stream. In a profile of a busy device API, that took a fifth of the
    process's busy time.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.monotonic()
        # An exception that escapes the app becomes a 500 in the server error middleware outside this one.
        status_code = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            template = route_template(scope)
            self.metrics.requests.labels(template, scope["method"], str(status_code)).inc()
            self.metrics.request_seconds.labels(template, scope["method"]).observe(time.monotonic() - started)


# The client calls an API process makes or could make; each one is a request to the Temporal server.
COUNTED_TEMPORAL_CALLS = (
    "start_workflow", "signal_workflow", "query_workflow", "describe_workflow", "cancel_workflow",
    "terminate_workflow", "start_workflow_update", "fetch_workflow_history_events", "list_workflows",
    "count_workflows", "heartbeat_async_activity", "complete_async_activity", "fail_async_activity",
    "report_cancellation_async_activity",
)


class TemporalCallCounter(temporal_client.Interceptor):
    """Client interceptor that counts every Temporal call of the API in `microupdates_api_temporal_calls_total`."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self.metrics = metrics

    def intercept_client(self, next: temporal_client.OutboundInterceptor) -> temporal_client.OutboundInterceptor:
        return _CountingOutbound(next, self.metrics.temporal_calls)


class _CountingOutbound(temporal_client.OutboundInterceptor):
    def __init__(self, next: temporal_client.OutboundInterceptor, calls: Counter) -> None:
        super().__init__(next)
        for name in COUNTED_TEMPORAL_CALLS:
            setattr(self, name, _counted(getattr(next, name), calls.labels(name)))


def _counted(call: Callable, counter) -> Callable:
    def counting(*args, **kwargs):
        counter.inc()
        return call(*args, **kwargs)

    return counting


def route_template(scope: Scope) -> str:
    """Return the matched route's path template with its router prefix, such as /device/v1/jobs/{job_id}/report.

    Templates, not paths, keep ids out of the label values. The router adds
    the matched route and its path parameters to the request's scope. The
    route of an included router contains only its own part of the path, so
    the prefix is taken from the request path.
    """

    template = getattr(scope.get("route"), "path", None)
    if template is None:
        return "unmatched"
    path_params = scope.get("path_params", {})
    try:
        rendered = template.format(**{name: str(value) for name, value in path_params.items()})
    except (KeyError, IndexError, ValueError):
        return template
    path = scope["path"]
    prefix = path[: len(path) - len(rendered)] if path.endswith(rendered) else ""
    return prefix + template
