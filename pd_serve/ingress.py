"""The OpenAI HTTP front: FastAPI inside a Ray Serve deployment.

Authenticates, validates with vLLM's own request models, and hands the parsed request to a
decode replica. Streams come back as already-formatted SSE text, in batches of whatever chunks
were ready, and go out unchanged. Errors leave here in OpenAI's shape (``errors.error_body``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from kv_transfer.metrics import derive
from pd_serve import metrics as m
from pd_serve.config import AppConfig
from pd_serve.errors import error_body
from pd_serve.protocol import JSONReply, RoutingHint
from pd_serve.tiny_model import resolve_model
from scheduler import block_keys

logger = logging.getLogger(__name__)
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
app = FastAPI(title="pd_serve", docs_url=None, redoc_url=None)


def _err(status: int, message: str, param: str | None = None, err_type: str | None = None) -> JSONResponse:
    m.INGRESS_ERRORS.labels(str(status)).inc()
    return JSONResponse(error_body(message, status, err_type, param), status_code=status)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int)) or None
    return f"{loc + ': ' if loc else ''}{first.get('msg')}", loc


class _Relabelled:
    """A prometheus collector that re-exposes scraped families with tier/replica labels."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: dict[str, Any], decode: Any, control: Any) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        self.cfg = AppConfig.model_validate(cfg)
        self.decode = decode.options(stream=True)
        self.control = control
        self.models = {self.cfg.model_name}
        self.request_models = {"completion": CompletionRequest, "chat": ChatCompletionRequest}
        self.api_keys = set(self.cfg.ingress.api_keys)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.cfg.model))
        self._http = httpx.AsyncClient(timeout=5.0)

    # -- admission --------------------------------------------------------------------------
    def _auth(self, request: Request) -> JSONResponse | None:
        if not self.api_keys:
            return None
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.api_keys:
            return _err(401, "invalid or missing API key", err_type="AuthenticationError")
        return None

    async def _parse(self, kind: str, request: Request) -> Any:
        body = await request.body()
        try:
            req = self.request_models[kind].model_validate_json(body)
        except ValidationError as e:
            if any(err.get("type") == "json_invalid" for err in e.errors()):
                return _err(400, "request body is not valid JSON")
            msg, param = _validation_message(e)
            return _err(400, msg, param)
        if getattr(req, "kv_transfer_params", None) is not None:
            # would make decode pull KV from wherever the client says
            return _err(400, "kv_transfer_params is set by pd_serve, not by clients", "kv_transfer_params")
        if req.model not in self.models:
            return _err(404, f"The model `{req.model}` does not exist.", "model", "NotFoundError")
        for field in ("max_tokens", "max_completion_tokens"):
            v = getattr(req, field, None)
            if v is not None and v < 1:
                return _err(400, f"{field} must be at least 1, got {v}", field)
        return req

    def _hint(self, request_id: str, ids: list[int]) -> RoutingHint:
        return RoutingHint(request_id, ids, block_keys(ids, self.cfg.block_size))

    def _render(self, kind: str, req: Any) -> RoutingHint | None:
        """Render the prompt to token ids once; they drive routing on both tiers.

        Completions: a text prompt is replaced by its ids, so the engines receive exactly these
        ids. Chat: the ids come from the model's own chat template (the engines render the same
        template; an integration test checks that the ids agree). Batched prompts and other
        shapes are routed by load only (``None``)."""
        try:
            if kind == "completion":
                if isinstance(req.prompt, str):
                    req.prompt = self.tokenizer(
                        req.prompt, add_special_tokens=getattr(req, "add_special_tokens", True)).input_ids
                if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
                    return self._hint(req.request_id, list(req.prompt))
                return None
            messages = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in req.messages]
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=True,
                **(req.chat_template_kwargs or {}))
            if not isinstance(ids, list):  # BatchEncoding in recent transformers
                ids = ids["input_ids"]
            return self._hint(req.request_id, list(ids))
        except Exception:  # routing quality only: the engine renders (and validates) itself
            logger.debug("request %s: could not render prompt for routing", req.request_id, exc_info=True)
            return None

    async def _serve(self, kind: str, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        req = await self._parse(kind, request)
        if isinstance(req, Response):
            return req
        hint = self._render(kind, req)
        for attempt in range(self.cfg.ingress.retries + 1):
            gen = self.decode.generate.remote(kind, req, hint)
            try:
                first = await gen.__anext__()
                break
            except StopAsyncIteration:
                return _err(500, "decode returned no answer")
            except asyncio.CancelledError:
                gen.cancel()
                raise
            except _REPLICA_GONE as e:  # the decode replica died: nothing was sent yet, try another
                logger.warning("request %s: decode replica failed before its first byte (attempt %d): %r",
                               req.request_id, attempt + 1, e)
                m.INGRESS_RETRIES.labels(type(e).__name__).inc()
            except Exception as e:
                logger.exception("request %s failed before its first byte", req.request_id)
                return _err(500, f"internal error: {type(e).__name__}", err_type="InternalServerError")
        else:
            return _err(503, "no decode replica could serve the request", err_type="ServiceUnavailableError")
        if isinstance(first, JSONReply):
            if first.status >= 400:
                m.INGRESS_ERRORS.labels(str(first.status)).inc()
            return Response(first.body, status_code=first.status, media_type="application/json")
        return StreamingResponse(self._stream(first, gen, req.request_id), media_type="text/event-stream")

    @staticmethod
    async def _stream(first: str, gen: Any, request_id: str) -> AsyncIterator[str]:
        try:
            yield first
            async for chunk in gen:
                yield chunk
        except asyncio.CancelledError:
            raise
        except Exception as e:  # decode died mid-stream: tell the client, in-band
            logger.warning("request %s: stream broke: %r", request_id, e)
            yield f"data: {json.dumps(error_body(f'stream interrupted: {type(e).__name__}', 503))}\n\n"
        finally:
            gen.cancel()  # no-op when finished; aborts decode (and prefill) on disconnect

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

        if (denied := self._auth(request)) is not None:
            return denied
        cards = [ModelCard(id=name, root=self.cfg.model, owned_by="pd_serve") for name in sorted(self.models)]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/health")
    async def health(self) -> Response:
        decode = await self.control.replicas.remote("decode")
        prefill = await self.control.replicas.remote("prefill")
        ok = len(decode) > 0
        return JSONResponse({"status": "ok" if ok else "unavailable", "decode_replicas": len(decode),
                             "prefill_replicas": len(prefill)}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        replicas = await self.control.replicas.remote()
        texts = await asyncio.gather(*(self._http.get(r.metrics_url) for r in replicas),
                                     return_exceptions=True)
        merged: dict[str, Metric] = {}
        for r, resp in zip(replicas, texts):
            if isinstance(resp, BaseException) or resp.status_code != 200:
                continue
            for fam in text_string_to_metric_families(resp.text):
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.samples.append(type(s)(s.name, {**s.labels, "tier": r.tier, "replica": r.replica_id},
                                               s.value, s.timestamp, s.exemplar))
        families = list(merged.values())
        families += derive(families)  # pd_serve_kv_transfer_* from the connector's own metrics
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Relabelled(families))
        own = generate_latest()  # this process: ingress counters
        return Response(generate_latest(reg) + own, media_type="text/plain; version=0.0.4")
