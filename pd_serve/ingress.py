"""The OpenAI HTTP front: FastAPI inside a Ray Serve deployment.

Authenticates, validates with vLLM's own request models, and hands the parsed request to a
decode replica. Streams come back as already-formatted SSE text, in batches of whatever chunks
were ready, and go out unchanged. Errors leave here in OpenAI's shape, built and counted in
``_respond`` from ``pd_serve.errors``' tree: validation failures (``pd_serve.validation``), routing's
404/405, the 413 body limit, and a catch-all (``_CatchAll``) that turns anything unexpected into a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import start_http_server
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from pd_serve import channel as ch
from pd_serve import failover
from pd_serve import metrics as m
from pd_serve import validation
from pd_serve.logs import to_serve_log
from pd_serve.config import AppConfig
from pd_serve.errors import (PDServeError, TooLarge, Unauthorized, error_body, http_error, internal, of_status,
                             request_validation_error)
from pd_serve.phases import InFlight, Tracer, phases
from pd_serve.protocol import Accepted, Head, JSONReply, RoutingHint, Sink
from pd_serve.tiny_model import resolve_model
from scheduler import block_keys

logger = logging.getLogger(__name__)
_REFRESH_S = 1.0          # how often /health's view of the replicas is refreshed
_STALE_S = 10.0           # /health says unavailable when that view is older than this
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
app = FastAPI(title="pd_serve", docs_url=None, redoc_url=None)


def _respond(e: PDServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one way an error leaves the ingress: OpenAI's shape, counted by status."""
    m.INGRESS_ERRORS.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _err(status: int, message: str, param: str | None = None, err_type: str | None = None,
         headers: dict[str, str] | None = None) -> JSONResponse:
    return _respond(of_status(status, message, param, err_type), headers)


def _too_large(limit: int) -> JSONResponse:
    return _respond(TooLarge(f"request body exceeds the limit of {limit} bytes (ingress.max_body_bytes)"))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing's own errors (404 unknown path, 405 wrong method) in OpenAI's shape."""
    return _respond(http_error(exc.status_code, exc.detail, request.method, request.url.path),
                    getattr(exc, "headers", None))


async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _respond(request_validation_error(list(exc.errors())))


class _CatchAll:
    """ASGI middleware: an exception that escapes a route before its response started becomes
    an OpenAI-shaped 500, counted; one raised after that (mid-stream) is left to the server."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            if started:
                raise
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            await _respond(internal(e))(scope, receive, send)


def _openapi() -> dict[str, Any]:
    """FastAPI's document, with the request bodies the routes read themselves described by
    vLLM's request models (and errors by its ``ErrorResponse``)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        app.openapi_schema = validation.add_request_bodies(
            spec, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest},
            ErrorResponse)
    return app.openapi_schema


app.add_exception_handler(StarletteHTTPException, _http_error)
app.add_exception_handler(RequestValidationError, _request_validation_error)
app.add_middleware(_CatchAll)
app.openapi = _openapi  # type: ignore[method-assign]


# Defined before the class: serve.ingress pickles the app's routes when the class is decorated.
class _NoDecode(Exception):
    """No decode replica took the request within ``ingress.no_decode_wait_s`` and none is alive."""


class _ClientGone(Exception):
    """The client disconnected before its answer started."""


async def _client_gone(request: Request) -> None:
    """Returns when the client has disconnected (its body was read already, so the next ASGI
    message is the disconnect). Cancelled once the answer starts: the response then watches."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server cannot tell: never report the client gone
        logger.debug("cannot watch for the client's disconnect", exc_info=True)
        await asyncio.Event().wait()


class _Resume:
    """What the ingress keeps of a resumable stream (``pd_serve.failover``): the request, its
    prompt ids, the token ids sent so far, and the decode replica streaming it."""

    __slots__ = ("kind", "req", "hint", "keep", "ids", "attempts", "replica")

    def __init__(self, kind: str, req: Any, hint: RoutingHint, keep: bool) -> None:
        self.kind, self.req, self.hint, self.keep = kind, req, hint, keep
        self.ids: list[int] = []
        self.attempts = 0
        self.replica = ""


class _Timing:
    """One request's ingress-side stamps (``time.time()``) and decode's ``Head``."""

    __slots__ = ("request_id", "kind", "received", "parsed", "rendered", "head")

    def __init__(self, request_id: str, kind: str, received: float, parsed: float, rendered: float,
                 head: Head) -> None:
        self.request_id, self.kind = request_id, kind
        self.received, self.parsed, self.rendered, self.head = received, parsed, rendered, head


async def _proxy_is_on() -> bool:
    """Whether Ray Serve's proxy runs: with ``ingress.listener: replica`` both would hold the
    port (the proxy also sets SO_REUSEPORT) and the kernel would split clients between them."""
    import ray
    from ray.serve.config import ProxyLocation

    try:
        controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        location = await controller.get_proxy_location.remote()
    except Exception:  # a Ray without this method: the launcher's config check still applies
        logger.warning("could not read Serve's proxy location", exc_info=True)
        return False
    return location is not None and location != ProxyLocation.Disabled


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port that the other ingress replicas of this node share
    (SO_REUSEPORT: the kernel spreads connections among the listening ones)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(
            f"ingress cannot listen on {host}:{port}: {e.strerror}. Another program holds the port, or Ray "
            "Serve's proxy does (ingress.listener: replica needs `proxy_location: Disabled` in the Serve "
            "config).") from e
    sock.setblocking(False)
    return sock


def _settle_reply(ticket: Any, reply: JSONReply) -> None:
    """Settle a whole (non-streamed) answer's reservation from its ``usage``."""
    if reply.status != 200:
        ticket.settle(0, 0, "failed")
        return
    try:
        u = json.loads(reply.body).get("usage") or {}
        ticket.settle(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
    except (ValueError, AttributeError, TypeError):
        ticket.release()  # usage unknown: charge the whole reservation


class _StreamUsage:
    """What a stream used, for its admission ticket: the prompt as rendered, and the completion
    tokens. Exact for a tracked stream (the token ids decode reported, ``pd_serve.failover``);
    otherwise one token per SSE event that carries output (vLLM sends one per engine step and
    choice), the role, usage and ``[DONE]`` events not counted."""

    __slots__ = ("prompt_tokens", "_resume", "_events", "_overhead")

    def __init__(self, kind: str, req: Any, prompt_tokens: int, resume: "_Resume | None") -> None:
        self.prompt_tokens, self._resume, self._events = prompt_tokens, resume, 0
        n = max(1, getattr(req, "n", 1) or 1)
        include_usage = bool(getattr(req, "stream_options", None) and req.stream_options.include_usage)
        self._overhead = 1 + (n if kind == "chat" else 0) + int(include_usage)

    def add(self, text: str) -> None:
        if self._resume is None:
            self._events += text.count("data: ")

    def completion_tokens(self) -> int:
        if self._resume is not None:
            return len(self._resume.ids)
        return max(0, self._events - self._overhead)


@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: dict[str, Any], decode: Any, control: Any) -> None:
        to_serve_log()
        m.init_series("ingress")
        from pd_serve.placement import pin_process

        self._replica_id = serve.get_replica_context().replica_id.unique_id
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        self.cfg = AppConfig.model_validate(cfg)
        pin_process(self.cfg.replica_cpu_cores if self.cfg.device == "cpu" else None)
        # Serve's gRPC transport (SERVE_REPLICA_ENV turns it on in every replica); a handle built
        # in the driver carries the driver's default, so ask for it here
        self.decode = decode.options(stream=True, _by_reference=False)
        self._decode_ctl = decode.options(_by_reference=False)  # unary calls (cancel_stream)
        self._bg: set[asyncio.Task] = set()
        self.control = control
        self.models = {self.cfg.model_name}
        self.request_models = {"completion": CompletionRequest, "chat": ChatCompletionRequest}
        # Tenants, keys, token budgets and priorities (pd_serve/admission.py); with several
        # ingress replicas the budgets are leased from one ledger actor (pd_serve/budget.py).
        from pd_serve.admission import Admission

        ledger = None
        if self.cfg.ingress.replicas > 1 and any(t.tokens_per_minute for t in self.cfg.admission.tenants):
            from pd_serve.budget import ledger_actor

            ledger = ledger_actor()
        self.admission = Admission.from_config(self.cfg, replica_id=self._replica_id, ledger=ledger)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.cfg.model))
        # Large bodies are parsed and tokenized on this thread, off the loop that streams
        # tokens, with a tokenizer of its own (a fast tokenizer must not be used by two
        # threads at once).
        self._offload = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pd-serve-parse")
        self._offload_tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.cfg.model))
        self._tracer = Tracer(self.cfg.ingress.otlp_endpoint) if self.cfg.ingress.otlp_endpoint else None
        # /health answers from this view of the replicas, refreshed off the request path.
        self._replicas: dict[str, int] = {"decode": 0, "prefill": 0}
        self._replicas_at = 0.0
        self._max_model_len: int | None = None  # decode's, once a decode replica reported it
        self._announced = False
        pre = self.cfg.prefill
        self._expect_prefill = (pre.autoscaling.min_replicas if pre.autoscaling else pre.fixed_replicas(1)) > 0
        # Own metrics on a port of their own, registered with control, which merges every
        # replica's page into /metrics (pd_serve.metrics_page).
        from ray.util import get_node_ip_address

        from kv_transfer.ports import claim_port
        from pd_serve.protocol import ReplicaInfo

        node = get_node_ip_address()
        mport = claim_port(node, 29600)
        start_http_server(mport, addr=node)
        self._info = ReplicaInfo(replica_id=self._replica_id, tier="ingress",
                                 metrics_url=f"http://{node}:{mport}/metrics", engine_id="", node_ip=node,
                                 pid=os.getpid())
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_replicas())
        # Streams come back on one channel per decode replica (pd_serve.channel), not one
        # Ray stream per request.
        self._sink = f"{self._replica_id}-{id(self):x}"
        self._inboxes = ch.Inboxes(self._open_channel)
        self._http_server: Any = None
        self._admission_started = asyncio.get_running_loop().create_task(self.admission.start())
        if self.cfg.ingress.listener == "replica":
            sock = _bind(self.cfg.ingress.host, self.cfg.ingress.port)  # a taken port fails the replica now
            self._listener = asyncio.get_running_loop().create_task(self._listen(sock))

    async def _listen(self, sock: socket.socket) -> None:
        """Serve the OpenAI endpoint from this replica (``ingress.listener: replica``): uvicorn on
        this event loop, so a streamed chunk goes from the decode channel to the client socket
        without another Ray hop. Starts once Serve has finished constructing the replica (the
        routes reach this instance through Serve's replica context)."""
        import uvicorn

        await self._admission_started  # first leases before the first request
        if await _proxy_is_on():
            sock.close()
            logger.error("ingress.listener is `replica` but Ray Serve's proxy is on: not listening on %s:%d (the "
                         "proxy serves it). Set `proxy_location: Disabled` in the Serve config, or "
                         "ingress.listener: serve_proxy", self.cfg.ingress.host, self.cfg.ingress.port)
            return
        sock.listen(2048)
        while serve.get_replica_context().servable_object is None:
            await asyncio.sleep(0.05)
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                timeout_keep_alive=30, timeout_graceful_shutdown=5)
        self._http_server = uvicorn.Server(config)
        try:
            await self._http_server.serve(sockets=[sock])
        except Exception:
            logger.exception("the ingress HTTP listener on %s:%d stopped", self.cfg.ingress.host, self.cfg.ingress.port)
            raise

    def _open_channel(self, replica: str) -> Any:
        return self.decode.channel.remote(self._sink, RoutingHint("channel", [], pin=replica))

    def _call(self, kind: str, req: Any, hint: RoutingHint | None, track: int) -> tuple[Any, int, asyncio.Queue]:
        """Send one request to a decode replica: its call (``Accepted``, then ``Head``), and the
        key and inbox under which the rest of its stream will arrive."""
        key, inbox = self._inboxes.new()
        return self.decode.generate.remote(kind, req, hint, track, Sink(self._sink, key)), key, inbox

    def _cancel_everywhere(self, key: int) -> None:
        """Tell every decode replica to abort this ingress's request ``key``
        (``DecodeServer.cancel_stream``), in the background. Cancelling the call alone does
        not reach a replica while the call is still on its way to it (measured: 4 of 16 streams
        whose clients left 0.05 s after sending ran to their end). Rare (clients that leave
        before the first byte), so one broadcast each is cheap."""
        async def send() -> None:
            try:
                await self._decode_ctl.broadcast("cancel_stream", self._sink, key).results_async()
            except Exception as e:  # a replica going away: it has no request to abort
                logger.debug("cancel_stream broadcast for %s/%d: %r", self._sink, key, e)

        t = asyncio.get_running_loop().create_task(send())
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _refresh_replicas(self) -> None:
        while True:
            try:
                await self.control.register.remote(self._info)  # so that the other ingresses gather our metrics
                infos = await self.control.replicas.remote()
                counts = {"decode": 0, "prefill": 0}
                for r in infos:
                    counts[r.tier] = counts.get(r.tier, 0) + 1
                lens = [r.max_model_len for r in infos if r.tier == "decode" and r.max_model_len]
                self._max_model_len = min(lens) if lens else self._max_model_len
                self._replicas, self._replicas_at = counts, time.monotonic()
                if not self._announced and counts["decode"] > 0 and (
                        counts["prefill"] > 0 or not self._expect_prefill):
                    self._announced = True  # one line for `serve run` users; make serve prints its own
                    # stdout: Ray forwards it to the driver whatever the log levels are
                    print(f"pd_serve ready: OpenAI API at http://{self.cfg.ingress.host}:{self.cfg.ingress.port}/v1 "
                          f"(decode {counts['decode']}, prefill {counts['prefill']} replica(s))", flush=True)
            except Exception:
                logger.warning("could not read the replica list from control", exc_info=True)
            await asyncio.sleep(_REFRESH_S)

    # -- admission --------------------------------------------------------------------------
    def _auth(self, request: Request) -> Any:
        """The request's tenant (``pd_serve.admission``), or the 401 to answer."""
        try:
            return self.admission.authenticate(request.headers.get("authorization"))
        except PDServeError as e:
            return _respond(e, e.headers)

    def _reservation(self, kind: str, req: Any, hint: RoutingHint | None) -> tuple[int, int]:
        """(prompt tokens, most completion tokens) to reserve: the rendered prompt, and the
        request's own limit (else what the context leaves), times its choices."""
        prompt = len(hint.token_ids) if hint is not None else 0
        limit = failover._budget(kind, req)
        if limit is None:
            limit = max(1, (self._max_model_len or 0) - prompt) if self._max_model_len else 0
        return prompt, limit * max(1, getattr(req, "n", 1) or 1)

    async def _read_body(self, request: Request) -> bytes | JSONResponse:
        """The body, or a 413 as soon as it is known to exceed ``ingress.max_body_bytes``
        (from Content-Length, else while it streams in)."""
        limit = self.cfg.ingress.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, kind: str, body: bytes) -> Any:
        """Validate ``body`` with vLLM's request model (``validation.parse``); a JSONResponse
        for bad input."""
        try:
            return validation.parse(self.request_models[kind], body, self.models)
        except PDServeError as e:
            return _respond(e)

    def _parse_and_render(self, kind: str, body: bytes, tokenizer: Any) -> tuple[Any, RoutingHint | None, float]:
        """Parse, then render; returns (request or error response, hint, when parsing ended)."""
        req = self._parse(kind, body)
        parsed = time.time()
        if isinstance(req, Response):
            return req, None, parsed
        return req, self._render(kind, req, tokenizer), parsed

    def _hint(self, request_id: str, ids: list[int]) -> RoutingHint:
        return RoutingHint(request_id, ids, block_keys(ids, self.cfg.block_size))

    def _render(self, kind: str, req: Any, tokenizer: Any) -> RoutingHint | None:
        """Render the prompt to token ids once; they drive routing on both tiers.

        Completions: a text prompt is replaced by its ids, so the engines receive exactly these
        ids. Chat: the ids come from the model's own chat template (the engines render the same
        template; an integration test checks that the ids agree). Batched prompts and other
        shapes are routed by load only (``None``)."""
        try:
            if kind == "completion":
                if isinstance(req.prompt, str):
                    req.prompt = tokenizer(
                        req.prompt, add_special_tokens=getattr(req, "add_special_tokens", True)).input_ids
                if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
                    return self._hint(req.request_id, list(req.prompt))
                return None
            messages = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in req.messages]
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=True,
                **(req.chat_template_kwargs or {}))
            if not isinstance(ids, list):  # BatchEncoding in recent transformers
                ids = ids["input_ids"]
            return self._hint(req.request_id, list(ids))
        except Exception:  # routing quality only: the engine renders (and validates) itself
            logger.debug("request %s: could not render prompt for routing", req.request_id, exc_info=True)
            return None

    async def _serve(self, kind: str, request: Request) -> Response:
        received = time.time()
        stage = InFlight(m.REQUESTS_IN_FLIGHT, "ingress")
        handed_over = False
        key = 0
        ticket = None
        gone: asyncio.Future | None = None
        try:
            tenant = self._auth(request)
            if isinstance(tenant, Response):
                return tenant
            body = await self._read_body(request)
            if isinstance(body, Response):
                return body
            if len(body) >= self.cfg.ingress.offload_body_bytes:
                req, hint, parsed = await asyncio.get_running_loop().run_in_executor(
                    self._offload, self._parse_and_render, kind, body, self._offload_tokenizer)
            else:
                req, hint, parsed = self._parse_and_render(kind, body, self.tokenizer)
            if isinstance(req, Response):
                return req
            rendered = time.time()
            try:
                ticket = await self.admission.admit_tenant(tenant, *self._reservation(kind, req, hint))
            except PDServeError as e:
                return _respond(e, e.headers)
            stage.move("to_decode")
            track = failover.track_mode(kind, req, hint is not None, self.cfg.ingress.retries > 0)
            resume = _Resume(kind, req, hint, track == failover.TRACK_KEEP) if track else None
            if track:
                req.return_token_ids = True  # decode reads the ids and strips them unless asked
            gone = asyncio.ensure_future(_client_gone(request))
            for attempt in range(self.cfg.ingress.retries + 1):
                self._inboxes.drop(key)
                gen, key, inbox = self._call(kind, req, hint, track)
                try:
                    head = await self._head(gen, stage, self._no_decode, gone)
                    break
                except _ClientGone:
                    gen.cancel()  # aborts decode and its remote prefill
                    self._cancel_everywhere(key)
                    m.CLIENT_ABORTS.labels("before_first_byte").inc()
                    return Response(status_code=499)  # nobody reads it
                except _NoDecode:
                    gen.cancel()
                    wait = self.cfg.ingress.no_decode_wait_s
                    return _err(503, f"no decode replica is alive (waited {wait:g} s); retry later",
                                err_type="ServiceUnavailableError",
                                headers={"Retry-After": str(max(1, round(wait)))})
                except StopAsyncIteration:
                    return _err(500, "decode returned no answer")
                except asyncio.CancelledError:
                    gen.cancel()
                    raise
                except _REPLICA_GONE as e:  # the decode replica died: nothing was sent yet, try another
                    logger.warning("request %s: decode replica failed before its first byte (attempt %d): %r",
                                   req.request_id, attempt + 1, e)
                    m.INGRESS_RETRIES.labels(next(c.__name__ for c in _REPLICA_GONE if isinstance(e, c))).inc()
                    stage.move("to_decode")
                except Exception as e:
                    logger.exception("request %s failed before its first byte", req.request_id)
                    return _err(500, f"internal error: {type(e).__name__}", err_type="InternalServerError")
            else:
                return _err(503, "no decode replica could serve the request", err_type="ServiceUnavailableError")
            timing = _Timing(req.request_id, kind, received, parsed, rendered, head)
            first = head.item
            ticket.first_token()
            if isinstance(first, JSONReply):
                if first.status >= 400:
                    m.INGRESS_ERRORS.labels(str(first.status)).inc()
                first_byte = time.time()
                self._trace(timing, self._observe(timing, first_byte), first_byte)
                _settle_reply(ticket, first)
                return Response(first.body, status_code=first.status, media_type="application/json",
                                headers=ticket.headers())
            handed_over = True
            self._inboxes.bind(key, head.timeline.replica)
            if resume is not None:
                resume.ids.extend(head.token_ids)
                resume.replica = head.timeline.replica
            usage = _StreamUsage(kind, req, len(hint.token_ids) if hint is not None else 0, resume)
            return StreamingResponse(self._stream(first, gen, key, inbox, timing, stage, resume, ticket, usage),
                                     media_type="text/event-stream", headers=ticket.headers())
        finally:
            if gone is not None:
                gone.cancel()
            if not handed_over:
                stage.close()
                self._inboxes.drop(key)
                if ticket is not None:
                    ticket.settle(0, 0, "failed")  # no-op once settled; else nothing reached an engine

    def _no_decode(self, waited: float) -> bool:
        """Give up on a request no decode replica has taken after ``waited`` seconds: only
        when the replica view (refreshed every second) shows none alive. Under load a queue
        in front of live replicas is normal and waits."""
        return waited >= self.cfg.ingress.no_decode_wait_s and self._replicas.get("decode", 0) == 0

    @staticmethod
    async def _head(gen: Any, stage: InFlight, give_up: Any = None, gone: "asyncio.Future | None" = None) -> Head:
        """Decode's ``Head``, moving the request to stage ``in_decode`` once decode has it.
        ``give_up(waited_s)`` is asked every 0.5 s until decode has taken the request; True
        raises ``_NoDecode``. ``gone`` (``_client_gone``) ending first raises ``_ClientGone``:
        a client that leaves while its prompt is prefilled is noticed at once, not at the
        first byte."""
        t0 = time.monotonic()

        async def step(check: Any) -> Any:
            nxt = asyncio.ensure_future(gen.__anext__())
            waits = (nxt,) if gone is None else (nxt, gone)
            try:
                while True:
                    done, _ = await asyncio.wait(waits, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                    if nxt in done:
                        return nxt.result()
                    if gone is not None and gone in done:
                        raise _ClientGone()
                    if check is not None and check(time.monotonic() - t0):
                        raise _NoDecode()
            finally:
                if not nxt.done():
                    nxt.cancel()

        item = await step(give_up)
        if isinstance(item, Accepted):
            stage.move("in_decode")
            item = await step(None)
        if not isinstance(item, Head):
            raise TypeError(f"decode answered {type(item).__name__}, not Head")
        return item

    @staticmethod
    def _observe(t: "_Timing", first_byte: float) -> list[tuple[str, float, float]]:
        """Record the request's phases up to ``first_byte``; returns them for ``_trace``."""
        chain = phases(t.received, t.parsed, t.rendered, t.head.timeline, first_byte)
        for name, start, stop in chain:
            m.PHASE_SECONDS.labels(name).observe(stop - start)
        return chain

    def _trace(self, t: "_Timing", chain: list[tuple[str, float, float]], end: float) -> None:
        """Export the request as spans, once it has ended (only with ``ingress.otlp_endpoint``)."""
        if self._tracer is not None:
            self._tracer.request(t.request_id, t.kind, chain, end, {"pd_serve.prefill": t.head.timeline.where})

    async def _stream(self, first: str, gen: Any, key: int, inbox: asyncio.Queue, timing: "_Timing",
                      stage: InFlight, resume: "_Resume | None", ticket: Any,
                      usage: "_StreamUsage") -> AsyncIterator[str]:
        """The SSE stream after its first text, from the request's inbox (``pd_serve.channel``):
        each write to the client holds everything that has arrived. If the decode replica dies
        mid-stream and the request is resumable (``pd_serve.failover``), it continues on
        another decode replica from the tokens already sent, at most ``ingress.retries`` times;
        otherwise, or when that fails too, the client gets an in-band OpenAI error and then
        ``[DONE]``."""
        stage.move("streaming")
        chain = self._observe(timing, time.time())
        rewrite = None
        outcome = "aborted"
        try:
            usage.add(first)
            yield first
            done = False
            while not done:
                payload = await inbox.get()
                parts: list[str] = []
                while True:
                    kind = type(payload)
                    if kind is str:
                        parts.append(payload)
                    elif kind is tuple:
                        resume.ids.extend(payload[1])  # type: ignore[union-attr]
                        parts.append(payload[0] if rewrite is None else rewrite(payload[0]))
                    elif payload is ch.END:
                        done = True
                        break
                    elif kind is ch.Gone:
                        break
                    else:
                        raise RuntimeError(payload.get("error", "decode failed"))
                    if inbox.empty():
                        break
                    payload = inbox.get_nowait()
                if parts:
                    text = "".join(parts)
                    usage.add(text)
                    yield text
                if type(payload) is ch.Gone:
                    if resume is None or resume.attempts >= self.cfg.ingress.retries:
                        raise payload.error
                    logger.warning("request %s: decode replica died mid-stream after %d tokens (%r); resuming",
                                   timing.request_id, len(resume.ids), payload.error)
                    gen.cancel()
                    self._inboxes.drop(key)
                    gen, key, inbox, text, rewrite = await self._resume(resume, first, stage)
                    usage.add(text)
                    yield text
            outcome = "finished"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # decode died mid-stream and could not be resumed: say so, in-band
            logger.warning("request %s: stream broke: %r", timing.request_id, e)
            if resume is not None:
                m.STREAM_FAILOVERS.labels("failed").inc()
            outcome = "failed"
            yield f"data: {json.dumps(error_body(f'stream interrupted: {type(e).__name__}', 503))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            ticket.settle(usage.prompt_tokens, usage.completion_tokens(), outcome)
            stage.close()
            self._inboxes.drop(key)
            gen.cancel()  # no-op when finished; aborts decode (and prefill) on disconnect
            self._trace(timing, chain, time.time())

    async def _resume(self, r: "_Resume", first: str, stage: InFlight) -> tuple[Any, int, asyncio.Queue, str, Any]:
        """Send the continuation of ``r`` to another decode replica; its call, key and inbox,
        its first text (rewritten into the original stream's shape) and the rewriter for the
        rest."""
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        r.attempts += 1
        body = failover.resume_body(r.kind, r.req, r.hint.token_ids, r.ids, self._max_model_len, r.attempts)
        if body is None:
            raise RuntimeError("nothing left to generate, or the context length is unknown")
        creq = CompletionRequest.model_validate(body)
        hint = RoutingHint(request_id=creq.request_id, token_ids=body["prompt"],
                           exclude=[r.replica] if r.replica else [])
        rewrite = failover.Rewriter(r.kind, first, len(r.hint.token_ids), len(r.ids), keep_ids=r.keep,
                                    usage=bool(r.req.stream_options and r.req.stream_options.include_usage))
        gen, key, inbox = self._call("completion", creq, hint, failover.TRACK_KEEP)
        try:
            head = await self._head(gen, stage)
        except BaseException:
            self._inboxes.drop(key)
            raise
        stage.move("streaming")
        if not isinstance(head.item, str):
            gen.cancel()
            self._inboxes.drop(key)
            raise RuntimeError(f"resumed request answered {head.item.status}: {head.item.body[:200]!r}")
        self._inboxes.bind(key, head.timeline.replica)
        r.ids.extend(head.token_ids)
        r.replica = head.timeline.replica
        m.STREAM_FAILOVERS.labels("resumed").inc()
        return gen, key, inbox, rewrite(head.item), rewrite

    async def __del__(self) -> None:
        """Serve's shutdown hook: unspent token leases go back to the ledger."""
        try:
            await self.admission.close()
        except Exception:
            logger.warning("could not hand token leases back", exc_info=True)

    # -- routes -----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        tenant = self._auth(request)
        if isinstance(tenant, Response):
            return tenant
        cards = [ModelCard(id=name, root=self.cfg.model, owned_by="pd_serve", max_model_len=self._max_model_len)
                 for name in sorted(self.models)]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/health")
    async def health(self) -> Response:
        """Answered from the replica view that a background task refreshes every second: no
        call to any other actor on the way, so it stays fast however loaded the app is."""
        age = time.monotonic() - self._replicas_at
        decode, prefill = self._replicas.get("decode", 0), self._replicas.get("prefill", 0)
        ok = decode > 0 and age < _STALE_S
        return JSONResponse({"status": "ok" if ok else "unavailable", "decode_replicas": decode,
                             "prefill_replicas": prefill, "view_age_s": round(age, 3)},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Every replica's registry, merged by the control replica (``pd_serve.metrics_page``):
        this replica only relays the bytes, so a scrape costs its event loop nothing."""
        text = await self.control.metrics_page.remote()
        return Response(text, media_type="text/plain; version=0.0.4")
