"""Prometheus metrics: one registry per app, exposed at GET /metrics by prometheus-client.

Owns the metric families (prefix `mlxgw_`, label `model`) and the three ways they are fed:
- `metrics_middleware` counts every /v1 and /api request by model, route and status, and gives
  each one a `RequestTimer` (reached through `current()`) that the routes feed with the worker's
  deltas: time to first token (from the request's arrival, streamed or not), inter-token
  latency, end-to-end latency, tokens in and out. A delta costs one clock read and a few
  observations on label children resolved once per model.
- `Metrics.on_event` listens to the supervisor's lifecycle events: loads, load failures and
  durations, evictions by reason, expiries, crashes, restarts, unloads.
- `_StateCollector` reads supervisor state at scrape time (worker memory from the workers'
  heartbeats, the ceiling, queue depth, in flight, state), so those gauges cost nothing between
  scrapes.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from mlx_gw.config import ModelConfig
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.supervision.status import State
from mlx_gw.gateway.supervision.supervisor import Supervisor
from mlx_gw.worker.protocol import Delta

COUNTED_PREFIXES = ("/v1", "/api")
CLIENT_GONE_STATUS = 499  # the client disconnected before the response ended (nginx's code)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    """Every metric family of one app, registered in its own registry."""

    def __init__(self, sup: Supervisor) -> None:
        disable_created_metrics()  # no `_created` series: noise for every label set
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mlxgw_requests", "Requests by model, route and HTTP status "
                                "(a stream that fails after its headers counts its error's "
                                "status; 499: the client went away)",
                                ["model", "route", "status"], registry=r)
        self.ttft = Histogram("mlxgw_time_to_first_token_seconds", "From the request's "
                              "arrival to its first generated token, streamed or not",
                              ["model"], buckets=TTFT_BUCKETS_S, registry=r)
        self.itl = Histogram("mlxgw_inter_token_latency_seconds", "Time between generated "
                             "tokens of one request", ["model"], buckets=ITL_BUCKETS_S,
                             registry=r)
        self.e2e = Histogram("mlxgw_e2e_request_latency_seconds", "From the request's arrival "
                             "to its last byte", ["model"], buckets=E2E_BUCKETS_S, registry=r)
        self.tokens = Counter("mlxgw_tokens", "Tokens by direction: in (prompt) and out "
                              "(generated)", ["model", "direction"], registry=r)
        self.cache_tokens = Counter("mlxgw_prompt_cache_tokens", "Prompt tokens of finished "
                                    "generations by kind: hit (served from the worker's "
                                    "prompt cache) or miss (prefilled)", ["model", "kind"],
                                    registry=r)
        self.loads = Counter("mlxgw_loads", "Completed model loads", ["model"], registry=r)
        self.load_failures = Counter("mlxgw_load_failures", "Failed model loads", ["model"],
                                     registry=r)
        self.load_duration = Histogram("mlxgw_load_duration_seconds", "From a load's request "
                                       "to the model being ready", ["model"],
                                       buckets=LOAD_BUCKETS_S, registry=r)
        self.evictions = Counter("mlxgw_evictions", "Models evicted to make room, by reason "
                                 "(memory, max_loaded_models)", ["model", "reason"], registry=r)
        self.expiries = Counter("mlxgw_expiries", "Models unloaded by keep_alive", ["model"],
                                registry=r)
        self.crashes = Counter("mlxgw_crashes", "Worker processes that died unasked",
                               ["model"], registry=r)
        self.restarts = Counter("mlxgw_restarts", "Loads after a crash", ["model"], registry=r)
        self.unloads = Counter("mlxgw_unloads", "Models unloaded on request or at shutdown",
                               ["model"], registry=r)
        r.register(_StateCollector(sup))
        self._children: dict[str, _Children] = {}
        # Generated tokens per model since start, counted as they arrive (the counter above
        # counts a request's tokens when it ends), for the dashboard's tokens/s.
        self.tokens_out: dict[str, int] = {}

    def children(self, model: str) -> _Children:
        c = self._children.get(model)
        if c is None:
            c = self._children[model] = _Children(self, model)
            self.tokens_out.setdefault(model, 0)
        return c

    def on_event(self, event: dict[str, Any]) -> None:
        model = event["model"]
        kind = event["type"]
        if kind == "ready":
            self.loads.labels(model).inc()
            if event.get("duration_s") is not None:
                self.load_duration.labels(model).observe(event["duration_s"])
        elif kind == "load_failed":
            self.load_failures.labels(model).inc()
        elif kind == "evict":
            self.evictions.labels(model, str(event.get("reason", "unknown"))).inc()
        elif kind == "expire":
            self.expiries.labels(model).inc()
        elif kind == "crash":
            self.crashes.labels(model).inc()
        elif kind == "restart":
            self.restarts.labels(model).inc()
        elif kind == "unload":
            self.unloads.labels(model).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Children:
    """One model's label children, resolved once (label lookups are the costly part)."""

    __slots__ = ("ttft", "itl", "e2e", "tokens_in", "tokens_out", "cache_hit", "cache_miss")

    def __init__(self, m: Metrics, model: str) -> None:
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.e2e = m.e2e.labels(model)
        self.tokens_in = m.tokens.labels(model, "in")
        self.tokens_out = m.tokens.labels(model, "out")
        self.cache_hit = m.cache_tokens.labels(model, "hit")
        self.cache_miss = m.cache_tokens.labels(model, "miss")


class RequestTimer:
    """One request's figures. `model` is set when the request resolves its model; the route passes
    `delta` as the worker stream's observer, and calls `failed` when a stream breaks after
    its headers went out; the middleware records the rest when the response ends."""

    __slots__ = ("_m", "model", "t0", "_t_last", "_out", "_in", "_cached", "status")

    def __init__(self, m: Metrics) -> None:
        self._m = m
        self.model = ""
        self.t0 = time.perf_counter()
        self._t_last = 0.0
        self._out = 0
        self._in = 0
        self._cached = 0
        self.status: int | None = None

    def delta(self, d: Delta) -> None:
        if d.prompt_tokens:
            self._in = d.prompt_tokens
        if d.cached_tokens:
            self._cached = d.cached_tokens
        n = d.completion_tokens - self._out
        if n <= 0:
            return
        now = time.perf_counter()
        m = self._m
        c = m.children(self.model)
        m.tokens_out[self.model] += n  # live, for the dashboard's tokens/s
        if self._out == 0:
            c.ttft.observe(now - self.t0)
            self._t_last = now
            n -= 1  # the first token has no predecessor
        if n > 0:  # one delta may carry several tokens (text held back by the detokenizer)
            gap = (now - self._t_last) / n
            for _ in range(n):
                c.itl.observe(gap)
        self._out = d.completion_tokens
        self._t_last = now

    def failed(self, status: int) -> None:
        self.status = status

    def _finish(self, route: str, status: int) -> None:
        m = self._m
        m.requests.labels(self.model, route, str(self.status or status)).inc()
        if not self.model:
            return
        c = m.children(self.model)
        c.e2e.observe(time.perf_counter() - self.t0)
        if self._in:
            c.tokens_in.inc(self._in)
        if self._out:
            c.tokens_out.inc(self._out)
            if self._in:  # a generation (not a count): its prefill hit or missed the cache
                c.cache_hit.inc(self._cached)
                c.cache_miss.inc(self._in - self._cached)


_current: contextvars.ContextVar[RequestTimer | None] = contextvars.ContextVar(
    "mlxgw_request_timer", default=None)


def current() -> RequestTimer | None:
    """The running request's timer (None outside a counted request)."""
    return _current.get()


def observer() -> Callable[[Delta], None] | None:
    """What a route passes as its worker stream's `observe`: the running request's timer."""
    timer = _current.get()
    return timer.delta if timer is not None else None


def _attribute(model: ModelConfig, name: str) -> None:
    """This request resolved its model: the request is this model's (any route)."""
    timer = _current.get()
    if timer is not None:
        timer.model = model.name


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: sees the final status, including the error middleware's and auth's."""
    m = request.app.get(METRICS)
    if m is None or not request.path.startswith(COUNTED_PREFIXES):
        return await handler(request)
    timer = RequestTimer(m)
    token = _current.set(timer)
    status = CLIENT_GONE_STATUS
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except Exception:
        status = 500
        raise
    finally:
        _current.reset(token)
        timer._finish(_route_name(request), status)


class _StateCollector(Collector):
    """Gauges that mirror supervisor state, read at scrape time."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def describe(self) -> list[Metric]:
        return []  # unchecked: its names never collide with the registry's other metrics

    def collect(self) -> Iterator[Metric]:
        sup = self._sup
        mem = GaugeMetricFamily("mlxgw_worker_memory_bytes", "Physical memory of each loaded "
                                "model's worker process, from its heartbeats", labels=["model"])
        queue = GaugeMetricFamily("mlxgw_queue_depth", "Requests waiting for the model (for "
                                  "its load, for room, or beyond max_batch)", labels=["model"])
        running = GaugeMetricFamily("mlxgw_in_flight_requests", "Requests being served by "
                                    "the model's worker", labels=["model"])
        worker = GaugeMetricFamily("mlxgw_worker_in_flight", "Sequences in the worker's "
                                   "batch, as its last heartbeat reported", labels=["model"])
        state = GaugeMetricFamily("mlxgw_model_state", "1 for the model's current state",
                                  labels=["model", "state"])
        cache = GaugeMetricFamily("mlxgw_prompt_cache_bytes", "KV each model's worker keeps "
                                  "across requests, by tier", labels=["model", "tier"])
        pinned = GaugeMetricFamily("mlxgw_model_pinned", "1 when the model is pinned (never "
                                   "evicted or expired)", labels=["model"])
        for s in sup.statuses():
            name = s.name
            if s.resident:
                mem.add_metric([name], s.memory_bytes)
            queue.add_metric([name], s.queued)
            running.add_metric([name], s.in_flight)
            worker.add_metric([name], s.worker_in_flight)
            for st in State:
                state.add_metric([name, st.value], 1 if st is s.state else 0)
            pinned.add_metric([name], 1 if s.pinned else 0)
            if s.resident:
                cache.add_metric([name, "memory"], s.prompt_cache_bytes)
                cache.add_metric([name, "disk"], s.prompt_cache_disk_bytes)
        yield from (mem, queue, running, worker, state, pinned, cache)
        spec = CounterMetricFamily("mlxgw_spec_tokens", "Speculative decoding's tokens since "
                                   "the worker loaded, by kind: proposed, accepted",
                                   labels=["model", "kind"])
        for s in sup.statuses():
            if s.speculative is not None and s.resident:
                spec.add_metric([s.name, "proposed"], s.speculative["proposed"])
                spec.add_metric([s.name, "accepted"], s.speculative["accepted"])
        yield spec
        yield GaugeMetricFamily("mlxgw_memory_limit_bytes", "The memory ceiling for all "
                                "workers together (gateway.memory_limit)", value=sup.ceiling)
        yield GaugeMetricFamily("mlxgw_resident_memory_bytes", "Memory counted against the "
                                "ceiling: loaded, loading and stopping workers",
                                value=sup.resident_bytes())


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application) -> Metrics:
    """Create the app's metrics, listen to its supervisor's events, route GET /metrics.
    The middleware is in build_app's list (it must be outermost)."""
    sup = app[SUPERVISOR]
    m = Metrics(sup)
    app[METRICS] = m
    sup.listeners.append(m.on_event)
    sup.resolve_observers.append(_attribute)
    app.add_routes(routes)
    return m
