"""``segcache serve --replicas N``: the Ray Serve application.

    HTTP -> Ray proxy -> SegcacheIngress (parses the body, computes the chain)
         -> handle call, route=<chain> -> SegmentRouter picks a replica
         -> SegcacheEngine replica: the engine + segcache's own FastAPI app, in process

The ingress exists because Ray's proxy gives a router no request body. It forwards
the raw request (method, path, headers, body) and the route key; the replica runs
it through ``segcache.server.app.create_app``'s ASGI app, so auth, errors, metrics,
segments and streaming are the single server's, and streams the response back
(first item: status and headers; then body chunks). A replica that dies before the
response started is retried on another (``retries``); once bytes have been sent the
stream ends with the replica.

Each replica loads its own weights and pins itself to its own cores (its
``local_rank`` picks them): decode kernels collapse when another busy process
shares a core.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig

from segcache.config import CacheConfig, Config, DeployConfig, ModelConfig, ServerConfig
from segcache.deploy.chain import ROUTE_ROOT, RouteKey, request_chain, route_chain
from segcache.deploy.kv_events import standalone_predicate
from segcache.deploy.routing import POLICIES, matched_tokens

log = logging.getLogger(__name__)
# Requests routed by their chain; a warm goes where the same segments will be asked for.
ROUTED_PATHS = ("/v1/chat/completions", "/v1/cache/warm")
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
RAY_PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter"


@dataclass
class ForwardRequest:
    """An HTTP request as the ingress received it. ``messages`` is the prompt text in
    unit order, for Ray's ``PrefixCacheAffinityRouter`` (it reads ``args[i].messages``)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    messages: list[dict[str, str]]


class WarmChains:
    """A ``TreeListener`` keeping the routing chains (``chain.route_chain``) of the
    segment-tree nodes a replica holds; ``snapshot`` is safe from any thread."""

    def __init__(self, skip: Callable[[str], bool]) -> None:
        self._skip = skip
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    @staticmethod
    def chain_of(node: Any) -> str:
        digests = []
        while node.parent is not None:
            digests.append(node.digest)
            node = node.parent
        return route_chain(digests[::-1])

    def stored(self, node: Any) -> None:
        if not self._skip(node.namespace):
            with self._lock:
                self._held[self.chain_of(node)] += 1

    def removed(self, node: Any, reason: str) -> None:
        if reason == "replace" or self._skip(node.namespace):
            return
        chain = self.chain_of(node)
        with self._lock:
            self._held[chain] -= 1
            if self._held[chain] <= 0:
                del self._held[chain]

    def matched_tokens(self, key: RouteKey) -> int:
        with self._lock:
            return matched_tokens(key, self._held)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._held)


def pin_cores(threads: int, rank: int) -> list[int]:
    """Give this process ``threads`` cores of its own (by ``rank``) and that many
    torch threads; returns the cores."""
    import torch

    cpus = sorted(os.sched_getaffinity(0))
    cores = sorted({cpus[(rank * threads + i) % len(cpus)] for i in range(threads)})
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    return cores


class EngineReplica:
    """One segcache engine and its HTTP app, called by handle from the ingress."""

    def __init__(self, make_engine: Callable[[], Any], server_cfg: ServerConfig, cache_cfg: CacheConfig,
                 threads: int, deploy_cfg: DeployConfig | None = None) -> None:
        from segcache.server.app import create_app

        rank = _local_rank()
        self.cores = pin_cores(threads, rank)
        self.engine = make_engine()
        if hasattr(self.engine, "hand_over_threads"):  # the engine thread runs the model
            self.engine.hand_over_threads()
        self.kv_events = _replica_publisher(deploy_cfg, rank, server_cfg.model_name or self.engine.model_name,
                                            self.engine)
        self.warm = WarmChains(standalone_predicate(self.engine))
        for node in self.engine.tree.nodes():  # what a lower tier or warm start brought
            if node.parent is not None:
                self.warm.stored(node)
        self.engine.tree.listeners.append(self.warm)
        self.app = create_app(self.engine, server_cfg, cache_cfg)
        self._inflight: dict[int, int] = {}
        self._stats_seq = 0  # reports made (record_routing_stats)
        self.replica_id = _replica_id()
        log.info("segcache engine replica %d on cores %s", rank, self.cores)

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router sees: warm routing chains, load in tokens (for every request in
        flight: prompt tokens not warm here + decode budget, down to the decode budget once
        its response streams), and ``seq``, the report's number."""
        self._stats_seq += 1  # the router drops what it sent once a later report covers it
        return {"warm": self.warm.snapshot(), "load": sum(self._inflight.values()), "cores": self.cores,
                "seq": self._stats_seq}

    async def forward(self, request: ForwardRequest, route: dict[str, Any] | None = None) -> AsyncIterator[Any]:
        cost = decode = 0
        if route:
            key = RouteKey.from_kwargs(route)
            decode = key.decode_tokens
            cost = key.prompt_tokens - self.warm.matched_tokens(key) + decode
        token = id(request)
        self._inflight[token] = cost
        try:
            async for item in asgi_stream(self.app, request):
                if isinstance(item, dict):  # the head: say who answered
                    item["headers"].append(("x-segcache-replica", self.replica_id))
                else:  # body bytes flow: the prompt is computed, only decoding is left
                    self._inflight[token] = min(self._inflight[token], decode)
                yield item
        finally:
            self._inflight.pop(token, None)

    def __del__(self) -> None:
        if getattr(self, "kv_events", None) is not None:
            self.kv_events.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain=False)


def _replica_publisher(deploy_cfg: DeployConfig | None, rank: int, model: str, engine: Any) -> Any:
    """Replica ``rank``'s KV event publisher: ``--kv-events``' port + 2 x rank (its replay
    socket on the next port), topic ``kv@<host>-<rank>@<model>``; None without the flag."""
    if deploy_cfg is None or deploy_cfg.kv_events is None:
        return None
    import socket

    from segcache.deploy.kv_events import KVEventPublisher, replay_endpoint_for, topic_for

    head, _, port = deploy_cfg.kv_events.rpartition(":")
    endpoint = f"{head}:{int(port) + 2 * rank}"
    pod = f"{deploy_cfg.pod_name or socket.gethostname()}-{rank}"
    publisher = KVEventPublisher(endpoint, replay_endpoint_for(endpoint), topic_for(pod, model))
    log.info("replica %d: KV events on %s", rank, endpoint)
    return publisher.attach_engine(engine)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (tests)
        return f"pid-{os.getpid()}"


def _local_rank() -> int:
    try:
        rank = serve.get_replica_context().rank
    except Exception:  # outside a replica (tests): rank 0
        return 0
    return int(getattr(rank, "local_rank", rank) or 0)


async def asgi_stream(app: Any, request: ForwardRequest) -> AsyncIterator[Any]:
    """Run ``request`` through the ASGI ``app`` in this process: yields
    ``{"status", "headers"}`` then each body chunk. Closing the iterator tells the app
    the client went away (the engine cancels the request)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query.encode(), "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": ("127.0.0.1", 0), "server": ("segcache", 80),
    }
    messages: asyncio.Queue[dict] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(scope, receive, messages.put))
    try:
        while True:
            getter = asyncio.ensure_future(messages.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                task.result()  # the app ended without finishing the response: raise its error
                return
            msg = getter.result()
            if msg["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
                yield {"status": msg["status"], "headers": headers}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)
            except Exception:  # the app's own error was already logged by it
                task.cancel()


@serve.ingress()
class Ingress:
    """Parses the body of a chat request, computes its routing chain and calls the
    engine deployment with it; everything else is forwarded as is."""

    def __init__(self, engine: Any, retries: int = 3, chars_per_token: float = 3.8,
                 chunks: bool = False) -> None:
        self.engine = engine.options(stream=True)
        self.retries = retries
        self.chars_per_token = chars_per_token
        self.chunks = chunks  # the replicas cut messages into chunks (--blend auto)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.add_api_route("/{path:path}", self.proxy, methods=METHODS)
        return app

    async def proxy(self, request: Request) -> Any:
        body = await request.body()
        fwd = ForwardRequest(request.method, request.url.path, request.url.query,
                             list(request.headers.items()), body, [{"content": request.url.path}])
        route = self.route_for(fwd)
        try:
            head, stream = await self._start(fwd, route)
        except (RayActorError, ActorUnavailableError) as exc:
            return JSONResponse({"error": {"message": f"no engine replica could take the request: {exc}",
                                           "type": "service_unavailable", "param": None, "code": None}},
                                status_code=503)
        headers = {k: v for k, v in head["headers"]}
        return StreamingResponse(stream, status_code=head["status"], headers=headers)

    def route_for(self, fwd: ForwardRequest) -> dict[str, Any] | None:
        if fwd.method != "POST" or fwd.path not in ROUTED_PATHS:
            return None
        try:
            import json

            body = json.loads(fwd.body)
        except (ValueError, UnicodeDecodeError):
            return None  # the replica answers the 400
        if not isinstance(body, dict):
            return None
        key = request_chain(body, ROUTE_ROOT, self.chars_per_token, chunks=self.chunks)
        fwd.messages = [{"content": key.text or fwd.path}]  # Ray's router divides by its length
        return key.to_kwargs()

    async def _start(self, fwd: ForwardRequest, route: dict[str, Any] | None) -> tuple[dict, AsyncIterator]:
        """The response head, retried on another replica while none has started."""
        for attempt in range(self.retries + 1):
            gen = self.engine.forward.remote(fwd, route=route)
            try:
                head = await gen.__anext__()
            except (RayActorError, ActorUnavailableError):
                if attempt == self.retries:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            return head, _rest(gen)
        raise AssertionError("unreachable")


async def _rest(gen: Any) -> AsyncIterator[bytes]:
    async for chunk in gen:
        yield chunk


def build_app(cfg: Config, replicas: int, *, make_engine: Callable[[], Any] | None = None,
              cpus_per_replica: float = 1.0, ingress_cpus: float = 0.0, max_ongoing_requests: int | None = None,
              policy: str = "prefix", retries: int = 3, router_kwargs: dict[str, Any] | None = None) -> Any:
    """The Serve application (ingress bound to the engine deployment). The ingress
    reserves no CPU by default (``ingress_cpus``): it parses JSON and hashes, and N
    replicas of one core each must fit an N-core host (with 0.5 for the ingress, two
    replicas on a 2-core machine were never scheduled)."""
    if policy not in POLICIES:
        raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    threads = max(1, int(cpus_per_replica))
    if make_engine is None:
        from segcache.engine.engine import Engine

        model = replace(cfg.model, threads=cfg.model.threads or threads)
        make_engine = partial(Engine.load, replace(cfg, model=model), False)
    if policy == "ray-prefix":
        router = RequestRouterConfig(request_router_class=RAY_PREFIX_ROUTER,
                                     request_routing_stats_period_s=0.5)
    else:
        router = RequestRouterConfig(request_router_class="segcache.deploy.ray_router.SegmentRouter",
                                     request_router_kwargs={"policy": policy, **(router_kwargs or {})},
                                     request_routing_stats_period_s=0.5)
    ongoing = max_ongoing_requests or cfg.scheduler.max_running + cfg.scheduler.max_waiting
    engine = serve.deployment(EngineReplica).options(
        name="SegcacheEngine", num_replicas=replicas, max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": cpus_per_replica,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}},
        request_router_config=router, health_check_period_s=1, health_check_timeout_s=30)
    ingress = serve.deployment(Ingress).options(name="SegcacheIngress", ray_actor_options={"num_cpus": ingress_cpus},
                                                max_ongoing_requests=1000)
    return ingress.bind(engine.bind(make_engine, cfg.server, cfg.cache, threads, cfg.deploy), retries,
                        chunks=cfg.cache.blend == "auto")


def app_builder(args: dict[str, str]) -> Any:
    """The application from string arguments: ``serve run segcache.deploy.ray_app:app_builder
    replicas=2`` and the ``import_path`` of a KubeRay ``RayService`` (DEPLOY.md). Keys:
    ``replicas``, ``routing``, ``cpus_per_replica``, ``model``, ``dtype``, ``cache_bytes``,
    ``redis_url``, ``api_keys``, ``kv_events``, ``pod_name``."""
    known = {"replicas", "routing", "cpus_per_replica", "model", "dtype", "cache_bytes", "redis_url",
             "api_keys", "kv_events", "pod_name"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; known: {sorted(known)}")
    cfg = Config(
        model=ModelConfig(path=args.get("model"), dtype=args.get("dtype", "auto")),
        cache=CacheConfig(cache_bytes=int(args.get("cache_bytes", CacheConfig.cache_bytes)),
                          redis_url=args.get("redis_url")),
        server=ServerConfig(api_keys_file=Path(args["api_keys"]) if args.get("api_keys") else None),
        deploy=DeployConfig(kv_events=args.get("kv_events"), pod_name=args.get("pod_name"),
                            replicas=int(args.get("replicas", 1)), routing=args.get("routing", "prefix")))
    return build_app(cfg, cfg.deploy.replicas or 1, policy=cfg.deploy.routing,
                     cpus_per_replica=float(args.get("cpus_per_replica", 1.0)))


def run(cfg: Config, cpus_per_replica: float = 1.0) -> None:
    """``segcache serve --replicas N``: start (or join) Ray, deploy, serve until interrupted."""
    import ray

    ray.init(address=cfg.deploy.ray_address, ignore_reinit_error=True)
    serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
    app = build_app(cfg, cfg.deploy.replicas or 1, policy=cfg.deploy.routing,
                    cpus_per_replica=cpus_per_replica)
    serve.run(app, name="segcache", route_prefix="/")
    log.info("segcache: %d replicas at http://%s:%d/v1 (routing: %s)", cfg.deploy.replicas,
             cfg.server.host, cfg.server.port, cfg.deploy.routing)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
