"""One vLLM engine inside a Ray Serve replica: start-up, OpenAI serving objects, metrics.

Shared by the prefill and decode deployments. ``EngineHost.start`` is called once per replica,
in its constructor; everything else is per request. vLLM is imported only here (and lazily),
so that building the application graph never needs an engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

from kv_transfer import ReplicaTransferIdentity, get_backend
from kv_transfer.ports import claim_core, claim_port
from pd_serve.config import AppConfig
from pd_serve.protocol import ReplicaStats
from pd_serve.tiny_model import resolve_model

logger = logging.getLogger(__name__)
Tier = Literal["prefill", "decode"]


def node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover - outside Ray
        pass
    return socket.gethostbyname(socket.gethostname())


@dataclass
class EnginePlan:
    """What one replica's engine will be started with (pure; unit-testable)."""

    engine_kwargs: dict[str, Any]
    env: dict[str, str]
    identity: ReplicaTransferIdentity | None


KV_EVENTS_TOPIC = "kv-events"
_STATS_TTL_S = 0.25


class PrefillRate:
    """An engine's measured prefill rate: prompt tokens it computed per second of busy time.

    The routers' cost model (``scheduler.plugins.prefill_cost``) turns queued prefill tokens
    into a wait with this rate, so it must be the rate at which a queue drains: tokens computed
    (vLLM's ``prompt_tokens`` minus its ``prefix_cache_hits``) over the wall time during which
    at least one request was in the engine (``enter``/``exit``). A per-request rate would be
    wrong under batching: two prompts prefilled in one step each take the whole step.

    ``update`` is called with the engine's counters at each stats read; once a window holds at
    least ``min_tokens`` computed tokens and ``min_busy_s`` of busy time it is folded into an
    exponential average. ``tps`` is None until the first window closes (routers then assume
    ``scheduler.state.DEFAULT_ASSUMED_PREFILL_TPS``)."""

    def __init__(self, clock: Any = time.monotonic, min_tokens: int = 1024, min_busy_s: float = 0.05,
                 alpha: float = 0.3) -> None:
        self._clock = clock
        self.min_tokens, self.min_busy_s, self.alpha = min_tokens, min_busy_s, alpha
        self._inflight = 0
        self._busy_s = 0.0          # closed busy intervals
        self._busy_since = 0.0      # start of the open one, while _inflight > 0
        self._win_tokens: float | None = None  # computed-token counter at the window's start
        self._win_busy = 0.0
        self.tps: float | None = None

    def enter(self) -> None:
        if self._inflight == 0:
            self._busy_since = self._clock()
        self._inflight += 1

    def exit(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._busy_s += self._clock() - self._busy_since

    def busy_s(self) -> float:
        return self._busy_s + (self._clock() - self._busy_since if self._inflight > 0 else 0.0)

    def update(self, computed_tokens: float) -> float | None:
        """Feed the engine's running total of computed prompt tokens; returns ``tps``."""
        busy = self.busy_s()
        if self._win_tokens is None or computed_tokens < self._win_tokens:  # first read, or a reset
            self._win_tokens, self._win_busy = computed_tokens, busy
            return self.tps
        tokens, dt = computed_tokens - self._win_tokens, busy - self._win_busy
        if tokens >= self.min_tokens and dt >= self.min_busy_s:
            rate = tokens / dt
            self.tps = rate if self.tps is None else (1 - self.alpha) * self.tps + self.alpha * rate
            self._win_tokens, self._win_busy = computed_tokens, busy
        return self.tps


def plan_engine(cfg: AppConfig, tier: Tier, *, replica_tag: str, host: str,
                side_channel_port: int | None, core: int | None,
                kv_events_port: int | None = None, kv_replay_port: int | None = None) -> EnginePlan:
    """Translate the app config into engine kwargs and environment for one replica."""
    t = getattr(cfg, tier)
    kwargs: dict[str, Any] = {
        "model": resolve_model(cfg.model),
        "served_model_name": [cfg.model_name],
        "tensor_parallel_size": t.tensor_parallel_size,
        "pipeline_parallel_size": t.pipeline_parallel_size,
        "enable_prefix_caching": True,
        "disable_log_stats": False,
    }
    kwargs.update(cfg.tier_engine_args(tier))
    if kv_events_port is not None:
        # The engine binds; routers and this replica's own decider subscribe.
        kwargs["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq",
                                      "endpoint": f"tcp://*:{kv_events_port}", "topic": KV_EVENTS_TOPIC}
        if kv_replay_port is not None:
            # vLLM's replay socket (ROUTER): a router that starts late, or missed a batch,
            # fetches the engine's recent batches instead of starting blind (scheduler/events.py).
            kwargs["kv_events_config"]["replay_endpoint"] = f"tcp://*:{kv_replay_port}"
    if cfg.device == "gpu" and t.world_size > 1:
        kwargs.setdefault("distributed_executor_backend", "ray")
    env: dict[str, str] = dict(t.env)
    if cfg.device == "cpu":
        if t.kv_cache_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(t.kv_cache_space_gib)
        if core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    ident = None
    if cfg.kv_transfer.backend is not None:
        kt = cfg.kv_transfer
        extra = {"kv_lease_duration": int(max(1, round(kt.lease_s))), **kt.extra_config}
        backend_kwargs: dict[str, Any] = {"buffer_device": kt.buffer_device, "extra_config": extra}
        if kt.backend == "nixl":
            backend_kwargs["ucx_tls"] = kt.ucx_tls
        backend = get_backend(kt.backend, **backend_kwargs)
        ident = ReplicaTransferIdentity(
            tier=tier, engine_id=f"{tier}-{replica_tag}",
            side_channel_host=kt.side_channel_host or host,
            side_channel_port=side_channel_port or 0)
        role = "producer" if tier == "prefill" else "consumer"
        kwargs["kv_transfer_config"] = backend.engine_config(role, ident)
        if tier == "decode":
            # A pull that fails (prefill died, network) either recomputes the missing blocks on
            # decode, counted in vllm:nixl_num_failed_transfers, or fails the request with an error
            # (`fail`, and `retry_prefill`, where DecodeServer then prefills again elsewhere).
            kwargs["kv_transfer_config"]["kv_load_failure_policy"] = (
                "recompute" if kt.failure_policy == "local_prefill" else "fail")
        env.update(backend.engine_env(ident))
    return EnginePlan(kwargs, env, ident)


class EngineHost:
    """Owns the AsyncLLM and vLLM's OpenAI serving objects for one replica."""

    def __init__(self, cfg: AppConfig, tier: Tier, replica_tag: str) -> None:
        self.cfg = cfg
        self.tier = tier
        self.replica_tag = replica_tag
        self.host = node_ip()
        t = getattr(cfg, tier)
        core = claim_core(t.cpu_cores) if (cfg.device == "cpu" and t.cpu_cores) else None
        port = None
        if cfg.kv_transfer.backend == "nixl":
            port = claim_port(cfg.kv_transfer.side_channel_host or self.host,
                              cfg.kv_transfer.side_channel_base_port)
        self.kv_events_port = claim_port(self.host, 26100) if cfg.router.kv_events else None
        self.kv_replay_port = claim_port(self.host, 26700) if cfg.router.kv_events else None
        self.plan = plan_engine(cfg, tier, replica_tag=replica_tag, host=self.host,
                                side_channel_port=port, core=core, kv_events_port=self.kv_events_port,
                                kv_replay_port=self.kv_replay_port)
        os.environ.update(self.plan.env)
        self.engine: Any = None
        self.serving_completion: Any = None
        self.serving_chat: Any = None
        self.serving_models: Any = None
        self.vllm_config: Any = None
        self._stats = ReplicaStats()
        self._stats_at = float("-inf")
        # Measured only where each call is one whole prefill (the prefill tier's non-streamed
        # max_tokens=1 requests); a decode call stays open while it streams.
        self.prefill_rate = PrefillRate() if tier == "prefill" else None

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.config import KVEventsConfig, KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(self.plan.engine_kwargs)
        if "kv_transfer_config" in kwargs:
            kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])
        if "kv_events_config" in kwargs:
            kwargs["kv_events_config"] = KVEventsConfig(**kwargs["kv_events_config"])
        engine_args = AsyncEngineArgs(**kwargs)
        t0 = time.perf_counter()
        self.vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        self.engine = AsyncLLM.from_vllm_config(
            self.vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
            disable_log_stats=False)
        state = State()
        args = argparse.Namespace(**(vars(FrontendArgs()) | vars(engine_args)))
        tasks = await self.engine.get_supported_tasks()
        await init_app_state(self.engine, state=state, args=args, supported_tasks=tasks)
        self.serving_completion = state.openai_serving_completion
        self.serving_chat = state.openai_serving_chat
        self.serving_models = state.openai_serving_models
        logger.info("%s engine %s up in %.1fs (env %s)", self.tier, self.replica_tag,
                    time.perf_counter() - t0, self.plan.env)

    @property
    def kv_events_endpoint(self) -> str | None:
        return None if self.kv_events_port is None else f"tcp://{self.host}:{self.kv_events_port}"

    @property
    def kv_events_replay_endpoint(self) -> str | None:
        return None if self.kv_replay_port is None else f"tcp://{self.host}:{self.kv_replay_port}"

    def stats(self) -> "ReplicaStats":
        """The engine's load as its own Prometheus gauges show it (this process's registry).

        Read by the heartbeat, Serve's routing-stats poll and the autoscaling report, each about
        once a second: one registry walk serves them all for ``_STATS_TTL_S``."""
        now = time.monotonic()
        if now - self._stats_at < _STATS_TTL_S:
            return self._stats
        from prometheus_client import REGISTRY

        want = {"vllm:kv_cache_usage_perc": "kv_usage", "vllm:num_requests_running": "num_running",
                "vllm:num_requests_waiting": "num_waiting", "vllm:prompt_tokens_total": "prompt",
                "vllm:prefix_cache_hits_total": "hits"}
        out = {"kv_usage": 0.0, "num_running": 0, "num_waiting": 0, "prompt": 0.0, "hits": 0.0}
        for fam in REGISTRY.collect():
            for sample in fam.samples:
                key = want.get(sample.name)
                if key is not None:
                    out[key] += sample.value
        self._stats = ReplicaStats(
            kv_usage=out["kv_usage"], num_running=int(out["num_running"]), num_waiting=int(out["num_waiting"]),
            capacity_blocks=int(self.vllm_config.cache_config.num_gpu_blocks or 0), block_size=self.block_size,
            kv_events_endpoint=self.kv_events_endpoint, kv_events_replay_endpoint=self.kv_events_replay_endpoint,
            kv_events_topic=KV_EVENTS_TOPIC if self.kv_events_port is not None else "",
            prefill_tps=self.prefill_rate.update(out["prompt"] - out["hits"]) if self.prefill_rate else None)
        self._stats_at = now
        return self._stats

    @property
    def block_size(self) -> int:
        return self.vllm_config.cache_config.block_size

    @property
    def max_model_len(self) -> int:
        return self.vllm_config.model_config.max_model_len

    def serving_for(self, kind: str) -> Any:
        return self.serving_chat if kind == "chat" else self.serving_completion

    async def create(self, kind: str, request: Any) -> Any:
        """Run vLLM's OpenAI handler for ``kind``. Returns a response, an SSE generator, or an
        ``ErrorResponse``: client errors vLLM raises (validation) are turned into the latter."""
        from vllm.exceptions import VLLMError

        serving = self.serving_for(kind)
        if self.prefill_rate is not None:
            self.prefill_rate.enter()
        try:
            if kind == "chat":
                return await serving.create_chat_completion(request, raw_request=None)
            return await serving.create_completion(request, raw_request=None)
        except (ValueError, VLLMError) as e:  # bad input (4xx) or a failed generation (5xx)
            return serving.create_error_response(e)
        finally:
            if self.prefill_rate is not None:
                self.prefill_rate.exit()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.plan.identity is not None:
            from kv_transfer import held

            held.remove(self.plan.identity.engine_id)


async def drain_batches(agen, max_items: int = 64, min_interval_s: float = 0.0):
    """Yield lists of items from ``agen``: each list holds whatever was ready.

    Streaming through Ray Serve costs a fixed overhead per yielded item, so when the engine
    produces tokens faster than the next hop takes them, they travel together instead of
    queueing one by one. The first list goes as soon as its first item is ready. With
    ``min_interval_s`` > 0, each later list waits until that long after the previous one
    (or until ``agen`` ends, never longer), so a stream costs at most one hop per interval
    however many streams share the replica. Cancelling the consumer cancels the producer
    task, which aborts the engine request.
    """
    q: asyncio.Queue = asyncio.Queue()
    done = object()
    ended = asyncio.Event()

    async def pump() -> None:
        try:
            async for item in agen:
                q.put_nowait(item)
        except BaseException as e:  # propagate errors (and cancellation) to the consumer
            q.put_nowait(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            q.put_nowait(done)
            ended.set()

    task = asyncio.ensure_future(pump())
    loop = asyncio.get_running_loop()
    try:
        while True:
            item = await q.get()
            batch = []
            while item is not done and not isinstance(item, BaseException):
                batch.append(item)
                if q.empty() or len(batch) >= max_items:
                    item = None
                    break
                item = q.get_nowait()
            if batch:
                sent = loop.time() if min_interval_s > 0 else 0.0
                yield batch
                if min_interval_s > 0 and item is None and not ended.is_set():
                    wait = sent + min_interval_s - loop.time()
                    if wait > 0:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(ended.wait(), wait)
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass
