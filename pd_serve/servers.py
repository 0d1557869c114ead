"""The engine deployments: prefill (KV producer) and decode (KV consumer and orchestrator).

A request's way (decode-first, as in DESIGN.md):

1. the ingress hands the parsed OpenAI request to a decode replica (``DecodeServer.generate``);
2. decode decides where to prefill: remotely when the prefill tier has live replicas (and the
   prompt passes the router's threshold), locally otherwise;
3. remote: a prefill replica runs the request with ``max_tokens=1`` and
   ``do_remote_decode`` (``PrefillServer.prefill``) and returns typed ``kv_transfer_params``;
4. decode runs the original request with those params: NIXL pulls the blocks, and the
   engine's SSE chunks go back to the ingress in drained batches (``drain_batches``).

Cancellation anywhere propagates down: Ray Serve cancels the nested calls, vLLM aborts the
engine requests, and blocks already prefilled but never pulled are released by decode's
rejection notice or, at worst, prefill's lease (``kv_transfer.lease_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os

import msgspec
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple

from prometheus_client import start_http_server

from kv_transfer import KVTransferParams, held, prefill_request_params
from kv_transfer.ports import claim_port
from pd_serve import channel as ch
from pd_serve import failover
from pd_serve import metrics as m
from pd_serve.autoscaling import KV_USAGE, QUEUED_PREFILL_TOKENS
from pd_serve.config import AppConfig
from pd_serve.control import HEARTBEAT_S
from pd_serve.engine import EngineHost, drain_batches
from pd_serve.errors import engine_error_body, engine_error_json, error_body, sse_error_messages
from pd_serve.engine import KV_EVENTS_TOPIC
from pd_serve.logs import to_serve_log
from pd_serve.phases import InFlight
from pd_serve.placement import pin_process
from pd_serve.protocol import (Accepted, DecodeTimeline, Head, JSONReply, PrefillResult, ReplicaInfo,
                               ReplicaStats, RequestKind, RoutingHint, Sink)
from scheduler import (DeciderParams, KVEventSubscriber, PrefixIndex, count_eligible, decide, load_profiles,
                       wakes_prefill)
from scheduler.plugins import SaturatedFilter

logger = logging.getLogger(__name__)
_METRICS_BASE_PORT = 29600
# How often, at most, decode asks Control again for a prefill view that shows no replica
# (DecodeServer._refresh_prefill_state); the heartbeat refreshes it every HEARTBEAT_S anyway.
PREFILL_STATE_REFRESH_S = 0.25
# How long a request waits for that answer before it decides on the view it has: Control answers
# in milliseconds, but a Control replica that is restarting must not hold up the request path.
PREFILL_STATE_WAIT_S = 0.2


# Seconds an engine replica is given to stop (Serve's graceful_shutdown_timeout_s) when it does
# not wait for anything first. A 70B engine's teardown (NCCL, CUDA contexts, eight workers) takes
# tens of seconds; killed early, it leaves GPUs that the next replica on the node finds still busy.
ENGINE_TEARDOWN_S = {"cpu": 5.0, "gpu": 60.0}


def _replica_tag() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit tests)
        import uuid

        return uuid.uuid4().hex[:8]


def _error_json(resp: Any, source: str) -> tuple[int, bytes]:
    """vLLM ErrorResponse -> (status, body): its error object, with a message naming what failed
    where vLLM gave none (``errors.engine_error_body``); ``source`` is the tier."""
    status = int(resp.error.code)
    return status, json.dumps(engine_error_body(status, resp.error.model_dump(), source)).encode()


class _EngineReplica:
    """What both tiers share: the engine, health, metrics endpoint and heartbeat."""

    tier: str

    async def _init(self, cfg: dict[str, Any], control: Any) -> None:
        to_serve_log()
        self.cfg = AppConfig.model_validate(cfg)
        self.replica_id = _replica_tag()
        self.host = EngineHost(self.cfg, self.tier, self.replica_id)
        await self.host.start()
        pin_process(self.cfg.replica_cpu_cores if self.cfg.device == "cpu" else None)  # after the engine forked
        port = claim_port(self.host.host, _METRICS_BASE_PORT)
        start_http_server(port, addr=self.host.host)
        self.info = ReplicaInfo(
            replica_id=self.replica_id, tier=self.tier,  # type: ignore[arg-type]
            metrics_url=f"http://{self.host.host}:{port}/metrics",
            engine_id=self.host.plan.identity.engine_id if self.host.plan.identity else "",
            node_ip=self.host.host, pid=os.getpid(), max_model_len=self.host.max_model_len)
        if self.host.plan.identity is not None:
            engine_id = self.host.plan.identity.engine_id
            m.REQUESTS_AWAITING_PULL.set_function(lambda: held.read(engine_id)[0])
            m.BLOCKS_AWAITING_PULL.set_function(lambda: held.read(engine_id)[1])
        self._control = control
        await control.register.remote(self.info)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            try:
                st = self.stats()
                self.info = msgspec.structs.replace(
                    self.info, kv_usage=st.kv_usage, num_running=st.num_running, num_waiting=st.num_waiting)
                await self._control.register.remote(self.info)
                await self._on_beat()
            except Exception:
                logger.warning("heartbeat to control failed", exc_info=True)
            await asyncio.sleep(HEARTBEAT_S)

    async def _on_beat(self) -> None:
        pass

    def stats(self) -> ReplicaStats:
        """This replica's ``ReplicaStats``: the engine's, plus what the replica itself knows."""
        return self.host.stats()

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Ray Serve every ``request_routing_stats_period_s``; read by the routers
        (``ReplicaStats.from_dict``). Serve keeps routing stats as a dict."""
        return self.stats().to_dict()

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising restarts the replica."""
        await self.host.check_health()

    async def reset_prefix_cache(self, replica_id: str | None = None) -> bool:
        """Drop this engine's cached prefix blocks (all replicas, or only ``replica_id``; meant
        for ``handle.broadcast``). The engine publishes AllBlocksCleared to the routers."""
        if replica_id is not None and replica_id != self.replica_id:
            return False
        return await self.host.engine.reset_prefix_cache()

    def __del__(self) -> None:
        try:
            self.host.shutdown()
        except Exception:
            pass


class PrefillServer(_EngineReplica):
    """KV producer: computes the prompt's KV and answers with where decode can pull it."""

    tier = "prefill"

    async def __init__(self, cfg: dict[str, Any], control: Any) -> None:
        self._queued_tokens = 0  # prompt tokens of requests queued or in prefill here
        await self._init(cfg, control)

    def stats(self) -> ReplicaStats:
        return msgspec.structs.replace(self.host.stats(), queued_prefill_tokens=float(self._queued_tokens))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The prefill tier scales on queued prefill work (``pd_serve.autoscaling``)."""
        return {QUEUED_PREFILL_TOKENS: float(self._queued_tokens)}

    async def prefill(self, kind: RequestKind, request: Any, hint: RoutingHint | None = None) -> PrefillResult:
        """Run ``request`` (already shaped for prefill) and return its kv_transfer_params.

        Called once per remotely-prefilled request by a decode replica. Errors vLLM reports
        (bad input) come back as a status and an OpenAI error body, not as exceptions.
        """
        t0 = time.perf_counter()
        tokens = len(hint.token_ids) if hint is not None else 0
        self._queued_tokens += tokens
        try:
            resp = await self.host.create(kind, request)
        finally:
            self._queued_tokens -= tokens
        if hasattr(resp, "error"):
            status, body = _error_json(resp, "prefill")
            return PrefillResult(status=status, error_body=body, replica_id=self.replica_id)
        return PrefillResult(
            status=200, kv_transfer_params=resp.kv_transfer_params,
            prompt_tokens=resp.usage.prompt_tokens if resp.usage else 0,
            replica_id=self.replica_id, compute_s=time.perf_counter() - t0)

    async def wake(self) -> str:
        """Nothing: sent by a decode replica while this tier has no replica (``PrefillWaker``),
        so that a request queues at the prefill handle and Ray Serve scales the tier up."""
        return self.replica_id

    # -- stopping: KV already handed to decode stays pullable -----------------------------------
    # Ray Serve stops a replica (scale-down, redeploy, app shutdown) by draining its ongoing
    # prefill() calls and then awaiting __del__, all within graceful_shutdown_timeout_s. The last
    # prefills' kv_transfer_params are then on their way to decode, which pulls the blocks over
    # NIXL from this engine: shutting the engine down at once would break those pulls (decode
    # recomputes, or fails under failure_policy: fail). So __del__ first waits until the engine
    # holds nothing awaiting a pull (kv_transfer.held), at most kv_transfer.lease_s (after
    # which vLLM frees the blocks anyway) and never into the time the engine needs to stop.
    PULL_POLL_S = 0.05
    # Serve's drain before __del__: one graceful_shutdown_wait_loop_s (2 s) plus the last prefills.
    DRAIN_ALLOWANCE_S = 5.0
    # Kept for the engine's own teardown after the wait, whatever the wait took: the same budget
    # every tier gets (ENGINE_TEARDOWN_S, app.GRACEFUL_SHUTDOWN_S), so a 70B engine keeps its
    # 60 s to release the GPUs however long the pulls took.
    STOP_RESERVE_S = ENGINE_TEARDOWN_S

    class PullWait(NamedTuple):
        outcome: str                # "none": nothing held; "released": all pulled (or freed); "timeout"
        waited_s: float
        held: tuple[int, int]       # (requests, blocks) awaiting a pull when the wait began
        left: tuple[int, int]       # ... when it ended

    @classmethod
    def graceful_shutdown_s(cls, cfg: AppConfig, teardown_s: float) -> float:
        """The prefill tier's graceful_shutdown_timeout_s, given the teardown budget of a replica
        that does not wait (``app.GRACEFUL_SHUTDOWN_S``): room for the drain, the wait for pulls
        (up to ``kv_transfer.lease_s``) and the engine's teardown after it."""
        return float(teardown_s) + cls.DRAIN_ALLOWANCE_S + cfg.kv_transfer.lease_s

    @classmethod
    def pull_wait_limit_s(cls, cfg: AppConfig, graceful_shutdown_s: float | None) -> float:
        """Longest __del__ waits for pulls: the lease, within the replica's shutdown budget
        (``graceful_shutdown_s``, the deployment's timeout; None when unknown) less the drain
        before __del__ and the engine's teardown after it."""
        limit = float(cfg.kv_transfer.lease_s)
        if graceful_shutdown_s is not None:
            limit = min(limit, graceful_shutdown_s - cls.DRAIN_ALLOWANCE_S - cls.STOP_RESERVE_S[cfg.device])
        return max(0.0, limit)

    @staticmethod
    async def wait_for_pulls(read: Callable[[], tuple[int, int]], limit_s: float, poll_s: float = PULL_POLL_S,
                             clock: Callable[[], float] = time.monotonic,
                             sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> "PrefillServer.PullWait":
        """Poll ``read`` (``held.read`` of this engine: requests and blocks awaiting a pull) every
        ``poll_s`` until it reads (0, 0) or ``limit_s`` has passed. A ledger that cannot be read
        ends the wait (nothing to wait on)."""
        t0 = clock()

        def held_now() -> tuple[int, int]:
            try:
                r, b = read()
                return int(r), int(b)
            except Exception:
                logger.warning("cannot read the KV held for pulls; not waiting", exc_info=True)
                return 0, 0

        first = last = held_now()
        if first[0] <= 0 and first[1] <= 0:
            return PrefillServer.PullWait("none", 0.0, first, first)
        while True:
            waited = clock() - t0
            if waited >= limit_s:
                return PrefillServer.PullWait("timeout", waited, first, last)
            await sleep(min(poll_s, limit_s - waited))
            last = held_now()
            if last[0] <= 0 and last[1] <= 0:
                return PrefillServer.PullWait("released", clock() - t0, first, last)

    def _graceful_shutdown_timeout_s(self) -> float | None:
        try:
            from ray import serve

            return float(serve.get_replica_context()._deployment_config.graceful_shutdown_timeout_s)
        except Exception:  # outside Serve (unit tests)
            return None

    async def _before_stop(self) -> PullWait | None:
        """Leave decode's view, then wait for the pulls of KV already handed out (see above)."""
        beat = getattr(self, "_heartbeat", None)
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(BaseException):
                await beat
        control = getattr(self, "_control", None)
        if control is not None:  # decode stops counting this replica as a prefill worker now
            try:
                await asyncio.wait_for(control.deregister.remote(self.replica_id), 1.0)
            except Exception as e:  # control gone too (app shutdown): its TTL drops the entry
                logger.info("prefill replica %s: deregistering from control failed: %r", self.replica_id, e)
        identity = self.host.plan.identity
        if identity is None:  # no KV transfer: nothing is ever held for a pull
            return None
        engine_id = identity.engine_id
        limit = self.pull_wait_limit_s(self.cfg, self._graceful_shutdown_timeout_s())
        w = await self.wait_for_pulls(lambda: held.read(engine_id), limit)
        if w.outcome == "released":
            logger.info("prefill replica %s stopping: waited %.2f s until decode pulled the KV of %d request(s) "
                        "(%d blocks)", self.replica_id, w.waited_s, *w.held)
        elif w.outcome == "timeout":
            logger.warning("prefill replica %s stopping: %d request(s) (%d blocks) still await a pull after "
                           "%.1f s (limit %.1f s: kv_transfer.lease_s within the shutdown budget); stopping the "
                           "engine anyway", self.replica_id, *w.left, w.waited_s, limit)
        return w

    async def __del__(self) -> None:
        """Ray Serve awaits this when it stops the replica, after draining its prefill() calls:
        wait for decode's pulls of the KV those prefills produced, then stop the engine."""
        try:
            await self._before_stop()
        except Exception:
            logger.warning("prefill replica stopping: waiting for pulls failed", exc_info=True)
        finally:
            _EngineReplica.__del__(self)


class PrefillWaker:
    """Wakes a prefill tier that has no replica, from one decode replica.

    At zero prefill replicas decode prefills every request locally, so no request ever reaches
    the prefill handle and the autoscaler, which counts the requests queued at handles
    (``PrefillQueuePolicy``), would keep the tier at zero. ``wake()`` sends one
    ``PrefillServer.wake`` call through the handle instead, fire-and-forget: it queues there
    until a replica runs it, which is the signal Serve scales up on. At most one is outstanding
    per decode replica; the request path never waits for it, and a failure is only logged and
    counted (``pd_serve_prefill_wakes_total``).
    """

    def __init__(self, prefill: Any) -> None:
        self._prefill = prefill
        self._task: asyncio.Task[None] | None = None

    @property
    def outstanding(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> bool:
        """Send a wake call unless one is outstanding; True when one was sent."""
        if self.outstanding:
            return False
        m.PREFILL_WAKES.labels("sent").inc()
        self._task = asyncio.get_running_loop().create_task(self._call())
        return True

    async def _call(self) -> None:
        try:
            replica = await self._prefill.wake.remote()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never the request's failure: the next long prompt wakes again
            m.PREFILL_WAKES.labels("failed").inc()
            logger.warning("waking the prefill tier failed: %r", e)
        else:
            m.PREFILL_WAKES.labels("answered").inc()
            logger.info("prefill tier woke up: replica %s answered", replica)


def prefill_filters(router: Any) -> tuple[Any, ...]:
    """The filters that make a prefill replica ineligible for the P/D decider: the scheduler's own
    (the prefill profile's when `router.profiles` is set, else a `saturated` filter at
    `prefill_saturation_kv_usage` and `prefill_max_waiting` waiting requests)."""
    if router.profiles:
        return load_profiles(router.profiles)["prefill"].filters
    return (SaturatedFilter(params={"kv_usage_threshold": router.prefill_saturation_kv_usage,
                                    "max_waiting": router.prefill_max_waiting - 1}),)  # saturated AT this many


class DecodeServer(_EngineReplica):
    """KV consumer that orchestrates each request: remote prefill (or local), then decode."""

    tier = "decode"

    async def __init__(self, cfg: dict[str, Any], control: Any, prefill: Any | None) -> None:
        m.init_series("decode")
        m.init_wake_series()
        # Serve's gRPC transport, as in the ingress (a handle built in the driver carries its default)
        self._prefill = prefill.options(_by_reference=False) if prefill is not None else None
        self._waker = PrefillWaker(prefill) if prefill is not None else None
        self._prefill_state: list[ReplicaInfo] = []
        self._state_refresh: asyncio.Future[None] | None = None  # _refresh_prefill_state
        self._state_refreshed_at = -math.inf
        self._outboxes: dict[str, ch.Outbox] = {}  # by ingress channel (pd_serve.channel)
        # The task serving each channelled stream, by (ingress channel, key): cancel_stream's
        # way to a request whose caller has gone; and the keys cancelled before they arrived.
        self._sink_tasks: dict[tuple[str, int], asyncio.Task] = {}
        self._cancelled_sinks: OrderedDict[tuple[str, int], None] = OrderedDict()
        await self._init(cfg, control)
        self._stream_interval_s = self.cfg.ingress.stream_interval_ms / 1000
        r = self.cfg.router
        self._decider = DeciderParams(threshold_tokens=r.remote_prefill_min_tokens)
        self._prefill_filters = prefill_filters(r)
        # What this engine caches, from its own KV events: the decider's "uncached suffix".
        self._own_index: PrefixIndex | None = None
        if self.host.kv_events_endpoint is not None:
            self._own_index = PrefixIndex(self.host.block_size)
            self._own_events = KVEventSubscriber(self._own_index, self.host.kv_events_endpoint,
                                                 self.replica_id, topic=KV_EVENTS_TOPIC,
                                                 replay_endpoint=self.host.kv_events_replay_endpoint)
            self._own_events.start()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The decode tier scales on KV-cache usage (``pd_serve.autoscaling``)."""
        return {KV_USAGE: float(self.host.stats().kv_usage)}

    async def _on_beat(self) -> None:
        if self._prefill is not None:
            await self._fetch_prefill_state()

    async def _refresh_prefill_state(self) -> None:
        """Ask Control again for a prefill view that shows no replica, before a request
        prefills locally for it: a replica that registered since the last heartbeat (the app
        just started, the tier just scaled up from zero) is used at once instead of up to
        ``HEARTBEAT_S`` later. Concurrent requests share one call, and a tier that really is at
        zero is asked at most every ``PREFILL_STATE_REFRESH_S``. A request waits at most
        ``PREFILL_STATE_WAIT_S`` for the answer (the call goes on and updates the view when it
        comes)."""
        if self._state_refresh is None:
            now = time.monotonic()
            if now - self._state_refreshed_at < PREFILL_STATE_REFRESH_S:
                return
            self._state_refreshed_at = now
            self._state_refresh = asyncio.ensure_future(self._fetch_prefill_state())
            self._state_refresh.add_done_callback(lambda _: setattr(self, "_state_refresh", None))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._state_refresh), PREFILL_STATE_WAIT_S)

    async def _fetch_prefill_state(self) -> None:
        try:
            self._prefill_state = await self._control.replicas.remote("prefill")
        except Exception:
            logger.warning("prefill state refresh from control failed", exc_info=True)

    # -- P/D decision -------------------------------------------------------------------------
    def _cached_tokens(self, hint: RoutingHint) -> int:
        if self._own_index is None:
            return 0
        matched = self._own_index.match(hint.keys_for(self.host.block_size)).get(self.replica_id, 0)
        return matched * self.host.block_size

    def _decide(self, hint: RoutingHint | None) -> tuple[str, str]:
        if self._prefill is None:
            return "local", "no_prefill_tier"
        workers, eligible = count_eligible(self._prefill_state, self._prefill_filters)
        if hint is None:  # no token ids (e.g. a batch prompt): only the tier's state decides
            prompt, cached = self._decider.threshold_tokens + 1, 0
        else:
            prompt, cached = len(hint.token_ids), self._cached_tokens(hint)
        d = decide(prompt, cached, workers, eligible, self._decider)
        return ("remote" if d.remote else "local"), str(d.reason)

    @staticmethod
    def _prefill_copy(kind: RequestKind, request: Any) -> Any:
        update: dict[str, Any] = {
            "max_tokens": 1, "stream": False, "stream_options": None, "min_tokens": 0,
            "n": 1, "kv_transfer_params": prefill_request_params(),
        }
        if kind == "chat" and getattr(request, "max_completion_tokens", None) is not None:
            update["max_completion_tokens"] = 1
        return request.model_copy(update=update)

    async def _prefill_once(self, kind: RequestKind, preq: Any, hint: RoutingHint | None, request_id: str,
                            marks: dict[str, float], stage: InFlight | None = None
                            ) -> tuple[PrefillResult | None, str, str | None]:
        """One remote prefill. Returns (result, outcome, replica): outcome ``ok`` (result may
        still be a 4xx the client must see), ``unavailable`` (no replica within
        ``prefill_select_timeout_s``) or ``failed`` (replica died, engine error, timeout)."""
        kt = self.cfg.kv_transfer
        t0 = time.perf_counter()
        async with contextlib.AsyncExitStack() as stack:
            try:
                selection = await asyncio.wait_for(
                    stack.enter_async_context(self._prefill.prefill.choose_replica(kind, preq, hint)),
                    kt.prefill_select_timeout_s)
            except asyncio.TimeoutError:
                return None, "unavailable", None
            marks["prefill_chosen"] = time.time()
            if stage is not None:
                stage.move("prefill")
            try:
                res: PrefillResult = await asyncio.wait_for(
                    self._prefill.dispatch(selection, kind, preq, hint), kt.prefill_timeout_s)
            except asyncio.CancelledError:
                m.CLIENT_ABORTS.labels("prefill").inc()
                raise
            except Exception as e:  # replica died, engine error, timeout
                reason = _failure_reason(e)
                m.REMOTE_PREFILL_FAILURES.labels(reason).inc()
                logger.warning("request %s: remote prefill on %s failed (%r)", request_id, selection.replica_id, e)
                return PrefillResult(status=502, error_body=_json(error_body(
                    f"remote prefill failed: {reason}", 502, "PrefillFailedError"))), "failed", selection.replica_id
        m.REMOTE_PREFILL_SECONDS.observe(time.perf_counter() - t0)
        if res.status >= 500:
            m.REMOTE_PREFILL_FAILURES.labels("http_5xx").inc()
            return res, "failed", selection.replica_id
        return res, "ok", selection.replica_id

    async def _remote_prefill(self, kind: RequestKind, request: Any, hint: RoutingHint | None,
                              failed: list[str], marks: dict[str, float], stage: InFlight | None = None
                              ) -> tuple[PrefillResult | None, str]:
        """Ask the prefill tier. Returns (result, reason); result None means: prefill locally.

        A prefill replica is reserved first (Ray Serve's ``choose_replica``): if none frees up
        within ``prefill_select_timeout_s`` (tier down, restarting or saturated), decode
        prefills locally at once instead of queueing behind it. A failed prefill follows
        ``failure_policy``; under ``retry_prefill`` the replicas in ``failed`` are excluded, and
        each entry there is one retry spent (after a failed prefill or a failed pull).
        """
        kt = self.cfg.kv_transfer
        preq = self._prefill_copy(kind, request)
        retried = False
        while True:
            routed = hint if not failed else (
                msgspec.structs.replace(hint, exclude=list(failed)) if hint is not None
                else RoutingHint(request.request_id, [], exclude=list(failed)))
            res, outcome, replica = await self._prefill_once(kind, preq, routed, request.request_id, marks, stage)
            if stage is not None:
                stage.move("prefill_select")  # a retry waits for another replica; the caller moves it on
            if outcome == "ok":
                return res, "prefill_retry" if retried else "remote"
            if outcome == "unavailable":
                return None, "prefill_unavailable" if not failed else "retry_unavailable"
            if kt.failure_policy == "fail":
                return res, "failed"
            if kt.failure_policy == "retry_prefill" and len(failed) < kt.prefill_retries:
                failed.append(replica or "")
                m.PREFILL_RETRIES.labels("prefill").inc()
                retried = True
                continue
            return None, "remote_failed"

    def _prefill_replica_of(self, params: dict[str, Any] | None) -> str:
        """The prefill replica whose engine holds the blocks ``params`` point at."""
        engine = (params or {}).get("remote_engine_id") or ""
        for p in self._prefill_state:
            if p.engine_id == engine:
                return p.replica_id
        return engine.removeprefix("prefill-")  # engine ids are "<tier>-<replica id>" (engine.plan_engine)

    # -- the request path ---------------------------------------------------------------------
    async def channel(self, sink: str, hint: RoutingHint) -> AsyncIterator[list[tuple[int, Any]]]:
        """The stream channel of ingress replica ``sink`` (``pd_serve.channel``): the rest of
        every stream this replica serves for it, batched. ``hint.pin`` names the replica the
        ingress meant; any other refuses, so a pin to a replica that is gone fails at once."""
        if hint.pin != self.replica_id:
            raise RuntimeError(f"stream channel for decode replica {hint.pin} reached {self.replica_id}")
        async for items in ch.drain(self._outbox(sink)):
            yield items

    def _outbox(self, sink: str) -> ch.Outbox:
        box = self._outboxes.get(sink)
        if box is None:
            box = self._outboxes[sink] = ch.Outbox()
        return box

    async def generate(self, kind: RequestKind, request: Any, hint: RoutingHint | None = None,
                       track: int = 0, sink: Sink | None = None
                       ) -> AsyncIterator[Accepted | Head | str | tuple[str, list[int]]]:
        """Serve one OpenAI request.

        Yields ``Accepted`` at once, then one ``Head`` whose ``item`` is the whole answer (a
        ``JSONReply``: a response or an error) or the stream's first SSE text, then the rest of
        the stream as strings, each holding every chunk that was ready (at most one string per
        ``ingress.stream_interval_ms`` after the first). ``Head.timeline`` says when each step
        happened (``pd_serve.phases``).

        Under ``failure_policy: retry_prefill`` a pull that fails before the first token (the
        decode engine runs with vLLM's ``kv_load_failure_policy: fail``) is retried: prefill
        again on another prefill replica, and once the retries are spent, on decode. Nothing
        has reached the client by then, so the retry is invisible to it except in latency.

        With ``track`` (``pd_serve.failover``; the ingress then asked vLLM for token ids), each
        batch goes as ``(text, token_ids)`` and ``Head.token_ids`` holds the first text's, so
        the ingress can resume the stream elsewhere if this replica dies; the ids are removed
        from the text unless the client asked for them.

        With ``sink``, everything after the ``Head`` goes to that ingress's stream channel
        instead (``pd_serve.channel``), ended by ``END`` (or an error payload); this call
        then yields nothing more and returns when the stream is over.
        """
        entered = time.time()
        sink_key = (sink.channel, sink.key) if sink is not None else None
        if sink_key is not None:
            if sink_key in self._cancelled_sinks:  # its client left before it got here
                del self._cancelled_sinks[sink_key]
                m.CLIENT_ABORTS.labels("before_start").inc()
                return
            task = asyncio.current_task()
            if task is not None:
                self._sink_tasks[sink_key] = task
        box = self._outbox(sink.channel) if sink is not None else None
        if box is not None:
            box.active += 1
        try:
            async for item in self._generate(kind, request, hint, track, entered, box, sink):
                yield item
        finally:
            if box is not None:
                box.active -= 1
            if sink_key is not None:
                self._sink_tasks.pop(sink_key, None)

    _CANCELLED_KEEP = 4096

    def cancel_stream(self, channel: str, key: int) -> bool:
        """Abort the request that ingress channel ``channel`` sent as ``key``, wherever it is
        (prefill, pull, streaming). Broadcast by an ingress whose client left before the first
        byte: cancelling the ingress's call does not reach the replica when the call is still on
        its way (the request would then run to its end for nobody). A key not here yet is
        remembered (the last ``_CANCELLED_KEEP``), so the request is dropped when it arrives.
        Returns whether a running request was cancelled."""
        task = self._sink_tasks.get((channel, key))
        if task is not None:
            if not task.done() and not task.cancelling():  # the call's own cancellation did not arrive
                logger.info("cancel_stream: request %s/%d was still running here; cancelled", channel, key)
            task.cancel()
            return True
        self._cancelled_sinks[(channel, key)] = None
        while len(self._cancelled_sinks) > self._CANCELLED_KEEP:
            self._cancelled_sinks.popitem(last=False)
        return False

    async def _generate(self, kind: RequestKind, request: Any, hint: RoutingHint | None, track: int,
                        entered: float, box: ch.Outbox | None, sink: Sink | None) -> AsyncIterator[Any]:
        yield Accepted(entered)
        api = "chat" if kind == "chat" else "completions"
        marks: dict[str, float] = {}
        stage = InFlight(m.REQUESTS_IN_FLIGHT, "first_token")
        stream = None
        finished = False
        try:
            first = await self._answer(kind, request, hint, api, marks, stage)
            stream = first.stream
            timeline = DecodeTimeline(
                entered=entered, prefill_chosen=marks.get("prefill_chosen", 0.0),
                prefill_done=marks.get("prefill_done", 0.0), first_token=time.time(), where=first.where,
                replica=self.replica_id)
            stage.move("streaming")
            tracked = bool(track) and isinstance(first.item, str)
            strip = track == failover.TRACK_STRIP
            if tracked:
                text, ids = failover.track_chunk(first.item, strip)
                yield Head(timeline, text, ids)
            else:
                yield Head(timeline, first.item)
            if box is not None and isinstance(first.item, str):
                await self._to_channel(box, sink.key, stream, tracked, strip)  # type: ignore[union-attr]
            elif stream is not None:
                async for batch in stream:
                    yield failover.track_chunk("".join(batch), strip) if tracked else "".join(batch)
            finished = True
        finally:
            stage.close()
            if stream is not None:
                if not finished:
                    m.CLIENT_ABORTS.labels("decode").inc()
                    await stream.aclose()
                m.REQUESTS.labels(api, "ok" if finished else "aborted").inc()

    @staticmethod
    async def _to_channel(box: ch.Outbox, key: int, stream: Any, tracked: bool, strip: bool) -> None:
        """The rest of a stream into its ingress's channel, then ``END``. A failure mid-stream
        goes as an error payload (the ingress tells its client in-band); cancellation (the
        client left) just ends it."""
        try:
            if stream is not None:
                async for batch in stream:
                    box.put(key, failover.track_chunk("".join(batch), strip) if tracked else "".join(batch))
        except Exception as e:
            logger.warning("stream %d failed mid-stream: %r", key, e)
            box.put(key, {"error": f"{type(e).__name__}: {e}"})
            raise
        finally:
            box.put(key, ch.END)

    async def _answer(self, kind: RequestKind, request: Any, hint: RoutingHint | None, api: str,
                      marks: dict[str, float], stage: InFlight) -> "_First":
        """The request path behind ``generate`` up to the first output: the whole answer, or
        the open stream and its first text. A stream opened here is closed if this is
        cancelled (client gone) before it is handed over."""
        kt = self.cfg.kv_transfer
        retry = kt.failure_policy == "retry_prefill"
        failed: list[str] = []  # prefill replicas that failed this request: one retry each
        # A trusted caller may hand over KV prefilled elsewhere (the ingress refuses these from
        # clients); then decode only pulls.
        if request.kv_transfer_params:
            where, reason = "external", "preset"
        else:
            if self._prefill is not None and not self._prefill_state:
                await self._refresh_prefill_state()
            where, reason = self._decide(hint)
        if self._waker is not None and wakes_prefill(reason, tier_configured=True):
            self._waker.wake()  # the tier has no replica: scale it up; this request prefills locally
        stream = None
        try:
            while True:
                if where == "remote":
                    request.kv_transfer_params = None
                    stage.move("prefill_select")
                    res, got = await self._remote_prefill(kind, request, hint, failed, marks, stage)
                    marks["prefill_done"] = time.time()
                    stage.move("first_token")
                    reason = reason if (got == "remote" and reason == "pull_retry") else got
                    if res is None:
                        where = "local"
                    elif res.status != 200:
                        m.REQUESTS.labels(api, "error").inc()
                        return _First(JSONReply(res.status, engine_error_json(res.status, res.error_body, "prefill")),
                                      None, where)
                    else:
                        request.kv_transfer_params = KVTransferParams.from_vllm(res.kv_transfer_params).to_vllm()
                m.PREFILL_DECISIONS.labels(where, reason).inc()
                pulls = retry and where != "local"

                result = await self.host.create(kind, request)
                stream = (_error_messages(drain_batches(result, min_interval_s=self._stream_interval_s))
                          if hasattr(result, "__aiter__") else None)
                head: list[str] = []
                if pulls and stream is not None:
                    head, pull_failed = await _stream_head(stream)
                else:
                    pull_failed = pulls and hasattr(result, "error") and result.error.code >= 500
                if pull_failed:
                    if stream is not None:
                        await stream.aclose()
                        stream = None
                    source = self._prefill_replica_of(request.kv_transfer_params)
                    logger.warning("request %s: KV pull from %s failed before the first token",
                                   request.request_id, source)
                    if self._prefill is None:  # KV handed over by a caller, and no prefill tier here
                        where, reason = "local", "pull_failed"
                    elif len(failed) < kt.prefill_retries:
                        failed.append(source)
                        m.PREFILL_RETRIES.labels("pull").inc()
                        where, reason = "remote", "pull_retry"
                    else:
                        where, reason = "local", "retries_exhausted"
                    request.kv_transfer_params = None
                    continue
                break

            if hasattr(result, "error"):
                m.REQUESTS.labels(api, "error").inc()
                return _First(JSONReply(*_error_json(result, "decode")), None, where)
            if stream is None:
                m.REQUESTS.labels(api, "ok").inc()
                return _First(JSONReply(200, result.model_dump_json().encode()), None, where)
            if not head:
                try:
                    head = ["".join(await stream.__anext__())]
                except StopAsyncIteration:
                    head = [""]
            return _First("".join(head), stream, where)
        except BaseException:
            if stream is not None:
                await stream.aclose()
            raise


class _First(msgspec.Struct):
    """What ``DecodeServer._answer`` returns: the answer, or the stream's first text and the
    open stream (None for a whole answer)."""

    item: JSONReply | str
    stream: Any
    where: str


async def _error_messages(stream: Any) -> AsyncIterator[list[str]]:
    """Decode's SSE batches, with a blank message in an in-band error event filled in
    (``errors.sse_error_messages``; other events pass untouched). Closing this closes ``stream``
    (which aborts the engine request)."""
    try:
        async for batch in stream:
            yield [sse_error_messages(x, "decode") for x in batch]
    finally:
        await stream.aclose()


async def _stream_head(stream: AsyncIterator[list[str]]) -> tuple[list[str], bool]:
    """Read SSE batches up to the first that carries output. Returns (batches read, joined;
    whether the engine failed before any output), so a failed pull can be retried unseen.

    vLLM's chat stream opens with a role-only chunk when the engine's first output arrives,
    even a failed one, so that chunk does not count as output."""
    head: list[str] = []
    async for batch in stream:
        head.append("".join(batch))
        for event in batch:
            payload = event.removeprefix("data: ").strip()
            if payload == "[DONE]":
                return head, False
            try:
                obj = json.loads(payload)
            except ValueError:
                return head, False
            if "error" in obj:
                return head, True
            if any(_is_output(c) for c in obj.get("choices") or ()):
                return head, False
    return head, False


def _is_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    if delta is None:  # completions
        return True
    return choice.get("finish_reason") is not None or any(
        v for k, v in delta.items() if k != "role")


def _failure_reason(e: BaseException) -> str:
    """A bounded label for a failed remote prefill (pd_serve_remote_prefill_failures_total)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, (RayActorError, ReplicaUnavailableError)):
        return "replica_gone"
    return "error"


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()
