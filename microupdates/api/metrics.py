"""Prometheus metrics of the API process, served at /metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
        @app.middleware("http")
        async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            started = time.monotonic()
            response = await call_next(request)
            template = route_template(request)
            self.requests.labels(template, request.method, str(response.status_code)).inc()
            self.request_seconds.labels(template, request.method).observe(time.monotonic() - started)
            return response

        @app.get("/metrics", include_in_schema=False)
        def read_metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


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


def route_template(request: Request) -> str:
    """Return the matched route's path template with its router prefix, such as /device/v1/jobs/{job_id}/report.

    Templates, not paths, keep ids out of the label values. The route of an
    included router contains only its own part of the path, so the prefix is
    taken from the request path.
    """

    route = request.scope.get("route")
    template = getattr(route, "path", None)
    if template is None:
        return "unmatched"
    try:
        rendered = template.format(**{name: str(value) for name, value in request.path_params.items()})
    except (KeyError, IndexError, ValueError):
        return template
    path = request.url.path
    prefix = path[: len(path) - len(rendered)] if path.endswith(rendered) else ""
    return prefix + template
