"""The application config: one pydantic model, ``extra="forbid"`` everywhere.

``serve run configs/X.yaml`` passes the YAML ``args:`` mapping to ``pd_serve.app:build_app``,
which validates it here. Typos and cross-field mistakes fail at start-up, with a message that
says what to change, before any replica or engine starts.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kv_transfer import BACKENDS
from pd_serve.engine_args import check_engine_args

# Engine args that pd_serve owns: setting them per tier would break the P/D contract.
_RESERVED_ENGINE_ARGS = {
    "model": "set `model` at the top level (both tiers must load the same path)",
    "kv_transfer_config": "set `kv_transfer` at the top level",
    "served_model_name": "set `served_model_name` at the top level",
    "tensor_parallel_size": "set the tier's `tensor_parallel_size`",
    "pipeline_parallel_size": "set the tier's `pipeline_parallel_size`",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingBounds(_Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas. Prefill may be 0: decode then prefills locally.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start; defaults to min_replicas.")
    target: float | None = Field(
        None, gt=0, description="Per-replica target of the tier's own signal: mean KV-cache usage (0-1] for "
        "decode (default 0.75), prompt tokens queued or in prefill for prefill (default 16384).")
    upscale_delay_s: float = Field(5.0, ge=0, description="How long a higher recommendation must hold before adding replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="How long a lower recommendation must hold before removing replicas.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingBounds":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class TierConfig(_Strict):
    """One tier (prefill or decode): its replicas, resources, parallelism and engine args."""

    replicas: int | None = Field(None, ge=0, description="Fixed replica count. Exclusive with `autoscaling`.")
    autoscaling: AutoscalingBounds | None = Field(None, description="Autoscaling bounds; exclusive with `replicas`.")
    tensor_parallel_size: int = Field(1, ge=1, description="TP degree of each engine (GPUs per replica with PP=1).")
    pipeline_parallel_size: int = Field(1, ge=1, description="PP degree of each engine.")
    num_cpus: float = Field(0.25, ge=0, description="CPUs Ray reserves for the replica actor itself.")
    num_gpus_per_worker: float = Field(0, ge=0, description="GPUs per engine worker (1 on GPU nodes, 0 on CPU).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. H100, A100-80G.")
    resources: dict[str, float] = Field(default_factory=dict, description="Extra Ray custom resources per replica.")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Placement-group strategy for the replica's engine workers.")
    cpu_cores: list[int] | None = Field(
        None, description="CPU only: cores the tier's engines are pinned to, one claimed per replica "
        "(VLLM_CPU_OMP_THREADS_BIND). None leaves vLLM's default binding.")
    kv_cache_space_gib: int | None = Field(None, ge=1, description="CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the engine process.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="vLLM engine args for this tier, over `engine_args` at the top level.")
    max_ongoing_requests: int = Field(256, ge=1, description="Ray Serve cap on concurrent requests per replica.")

    @model_validator(mode="after")
    def _one_sizing(self) -> "TierConfig":
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("set either `replicas` or `autoscaling`, not both")
        for k in self.engine_args:
            if k in _RESERVED_ENGINE_ARGS:
                raise ValueError(f"engine_args.{k} is managed by pd_serve: {_RESERVED_ENGINE_ARGS[k]}")
        check_engine_args(self.engine_args)
        return self

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def fixed_replicas(self, default: int) -> int:
        return default if self.replicas is None else self.replicas


class KVTransferSection(_Strict):
    backend: str | None = Field("nixl", description=f"Connector backend: one of {sorted(BACKENDS)}, "
                                "or null for no transfer (then the prefill tier must have no replicas).")
    buffer_device: Literal["cpu", "cuda", "xpu"] = Field("cpu", description="Where the connector stages KV: `cpu` on CPU hosts, `cuda` on GPUs.")
    side_channel_base_port: int = Field(25600, ge=1024, le=65000, description="First NIXL side-channel port tried on each node.")
    side_channel_host: str | None = Field(None, description="Address peers reach this node's side channel on; default: the node IP.")
    lease_s: float = Field(30.0, gt=0, description="Prefill frees blocks decode has not pulled within this many seconds (vLLM's default is 480).")
    ucx_tls: str | None = Field(None, description="UCX transports (UCX_TLS). Keep `tcp` in the list on hosts without RDMA.")
    extra_config: dict[str, Any] = Field(default_factory=dict, description="kv_connector_extra_config passed to vLLM (e.g. num_threads).")
    prefill_select_timeout_s: float = Field(
        1.0, gt=0, description="Longest decode waits for a free prefill replica; then it prefills locally "
        "(prefill tier down, restarting or saturated).")
    prefill_timeout_s: float = Field(
        60.0, gt=0, description="Longest decode waits for a remote prefill before the failure policy applies.")
    failure_policy: Literal["local_prefill", "retry_prefill", "fail"] = Field(
        "local_prefill", description="When remote prefill or the KV pull fails: prefill (or recompute the missing "
        "blocks) on the decode engine; prefill again on another prefill replica (up to `prefill_retries` times, "
        "then on decode); or return an error. Failures are counted either way.")
    prefill_retries: int = Field(
        1, ge=1, le=8, description="`retry_prefill`: how many other prefill replicas to try for one request "
        "before prefilling on decode. Each waits at most `prefill_select_timeout_s` for a replica. "
        "The `prefix_aware` and `round_robin` routers avoid replicas that already failed the request "
        "(while another exists); `ray_default` does not.")

    @model_validator(mode="after")
    def _known_backend(self) -> "KVTransferSection":
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown kv_transfer.backend {self.backend!r}; choose one of {sorted(BACKENDS)}")
        return self


class RouterSection(_Strict):
    """Replica choice on both tiers and the P/D decision (docs/scheduler.md)."""

    policy: Literal["prefix_aware", "round_robin", "ray_default"] = Field(
        "prefix_aware", description="Replica choice: pd_serve's scheduler, plain round robin (a baseline), "
        "or Ray Serve's default power-of-two-choices.")
    kv_events: bool = Field(True, description="Engines publish KV events (ZMQ) that feed the prefix index "
                            "exactly; off, the index learns from routing history only.")
    profiles: dict[str, Any] | None = Field(
        None, description="Scheduler plugins and profiles (`plugins:` / `profiles:` as in docs/scheduler.md); "
        "None uses the defaults.")
    remote_prefill_min_tokens: int = Field(
        256, ge=0, description="P/D decider: prefill on the decode engine when at most this many prompt tokens "
        "are not already cached there.")
    prefill_saturation_kv_usage: float = Field(
        0.95, gt=0, le=1, description="A prefill replica at or above this KV usage counts as saturated.")
    prefill_max_waiting: int = Field(
        64, ge=1, description="A prefill replica with this many waiting requests counts as saturated.")
    stats_period_s: float = Field(1.0, gt=0, description="How often replicas report KV usage and queues to the routers.")

    @model_validator(mode="after")
    def _profiles_load(self) -> "RouterSection":
        if self.profiles is not None:
            from scheduler import load_profiles

            load_profiles(self.profiles)  # raises ConfigError naming the dangling/duplicate reference
        return self


class IngressSection(_Strict):
    host: str = Field("127.0.0.1", description="Address the OpenAI endpoint listens on (Serve http_options.host).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI endpoint (Serve http_options.port).")
    listener: Literal["replica", "serve_proxy"] = Field(
        "replica", description="Who serves HTTP on host:port. `replica`: each ingress replica itself "
        "(uvicorn on its own event loop, SO_REUSEPORT), so streamed tokens skip a Ray hop; the Serve "
        "config must then say `proxy_location: Disabled`. `serve_proxy`: Ray Serve's proxy, which forwards "
        "every request and every streamed chunk to an ingress replica over Ray (needed where something "
        "probes the proxy, e.g. KubeRay's readiness checks).")
    replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs per ingress replica.")
    api_keys: list[str] = Field(default_factory=list, description="Deprecated, use `admission.tenants`: accepted "
                                "bearer tokens, as one tenant `default` without limits; empty (and no tenants) disables auth.")
    retries: int = Field(1, ge=0, le=5, description="Times a request moves to another decode replica when its "
                         "replica dies: before the first byte, the same request again; mid-stream, resumed "
                         "from the tokens already sent (streams with one choice; pd_serve/failover.py). 0 "
                         "turns both off.")
    no_decode_wait_s: float = Field(
        5.0, gt=0, description="With no decode replica alive, a request that none has taken after this "
        "long gets a 503 with Retry-After instead of waiting for a restart.")
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest request body accepted; larger ones get an OpenAI-shaped 413 "
        "before they are read whole.")
    offload_body_bytes: int = Field(
        32 * 2**10, ge=0, description="Bodies at least this large are parsed and tokenized on a worker thread, "
        "so a large prompt never stalls the event loop that streams other requests' tokens.")
    stream_interval_ms: float = Field(
        0.0, ge=0, le=1000, description="Decode sends a stream's tokens to the ingress at most this often "
        "(the first token always at once); tokens that arrive in between travel together. 0 sends each "
        "engine output as soon as it is ready.")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces). When set, each "
        "request's phases are exported as OpenTelemetry spans; unset costs nothing.")


# Tenant names the admission metrics use for themselves: `none` (a request with no valid key),
# `anonymous` (auth is off), `default` (the deprecated ingress.api_keys).
RESERVED_TENANTS = ("none", "anonymous", "default")
_KEY_REF = re.compile(r"sha256:[0-9a-f]{64}|env:[A-Za-z_][A-Za-z0-9_]*|file:.+")


def _check_key_refs(refs: list[str], where: str) -> list[str]:
    """Key references as written in the config: ``sha256:<64 hex>`` (lower-cased here),
    ``env:VAR`` or ``file:PATH``. A plaintext key is refused with its hash in the message, so
    the fix is a copy and paste; the key itself is never repeated."""
    out = []
    for i, ref in enumerate(refs):
        if ref[:7].lower() == "sha256:":
            ref = "sha256:" + ref[7:].strip().lower()
        if not _KEY_REF.fullmatch(ref):
            if ref.startswith(("sha256:", "env:", "file:")):
                raise ValueError(f"{where}[{i}]: malformed key reference (`{ref.split(':', 1)[0]}:`); write "
                                 "`sha256:<64 hex digits>`, `env:VAR_NAME` or `file:/path/to/key`")
            digest = hashlib.sha256(ref.encode()).hexdigest()
            raise ValueError(
                f"{where}[{i}] is a plaintext key; the config holds only key hashes. Write "
                f"`sha256:{digest}` (this key's sha256; `python -m pd_serve.admission hash-key` prints "
                "it for a key read from stdin), or `env:VAR` / `file:PATH` to read the key at start-up")
        out.append(ref)
    return out


class TenantConfig(_Strict):
    """A tenant: who it is (its API keys), its priority class and its limits."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="Tenant name: the `tenant` label of the admission metrics.")
    api_keys: list[str] = Field(
        default_factory=list, description="The tenant's bearer keys, never in plaintext: `sha256:<hex>` (the "
        "key's sha256; `python -m pd_serve.admission hash-key`), or `env:VAR` / `file:PATH`, read and hashed "
        "when the ingress starts.")
    revoked_keys: list[str] = Field(
        default_factory=list, description="Keys that once were the tenant's, written the same way: they get "
        "a 401 that says the key was revoked.")
    priority: str = Field("standard", description="Priority class (a name in `admission.classes`).")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Token budget (prompt + completion) per minute: a bucket of this many tokens "
        "refilled continuously. Each request reserves prompt + max_tokens at admission and is settled to "
        "its actual usage when it ends. None: no token limit.")
    max_concurrent_requests: int | None = Field(
        None, ge=1, description="Requests of this tenant admitted at once (queued or running); split "
        "evenly over the ingress replicas. None: no cap.")

    @field_validator("api_keys", "revoked_keys")
    @classmethod
    def _key_refs(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return _check_key_refs(v, f"tenant {info.data.get('name', '?')}: {info.field_name}")

    @model_validator(mode="after")
    def _keys(self) -> "TenantConfig":
        if set(self.api_keys) & set(self.revoked_keys):
            raise ValueError(f"tenant {self.name}: a key is in both api_keys and revoked_keys")
        return self


class PriorityClassConfig(_Strict):
    """A priority class: its admission queue and its time-to-first-token deadline."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$", description="Class name.")
    max_queue: int = Field(64, ge=0, description="Requests of this class that may wait for a slot (per "
                           "ingress replica); past it, a 503 with Retry-After at once. 0: never wait.")
    ttft_deadline_s: float | None = Field(
        None, gt=0, description="Reject at the door (503) a request whose predicted wait for a slot exceeds "
        "this; None: `admission.ttft_deadline_s`.")
    max_queue_wait_s: float = Field(30.0, gt=0, description="Longest a request waits in the queue before "
                                    "it gets a 503 with Retry-After.")


class LeaseSection(_Strict):
    """How ingress replicas share one token budget per tenant (docs/admission.md)."""

    max_fraction: float = Field(
        0.1, gt=0, le=1, description="Most of a tenant's tokens_per_minute one ingress replica holds as a "
        "lease. The overshoot bound: over any interval, a tenant is admitted at most its budget plus the "
        "sum of its replicas' lease caps (replicas x this x tokens_per_minute).")
    sync_period_s: float = Field(0.5, gt=0, description="How often each ingress replica reports its balances "
                                 "and tops up its leases (in the background, one call for all tenants).")
    ttl_s: float = Field(10.0, gt=0, description="A lease not renewed for this long is void: the replica "
                         "stops spending it and the ledger forgets the replica.")
    wait_s: float = Field(0.25, ge=0, description="Longest a request waits for a lease top-up when its "
                          "replica's lease is short but the tenant's budget has tokens; then a 429.")

    @model_validator(mode="after")
    def _periods(self) -> "LeaseSection":
        if self.ttl_s <= 2 * self.sync_period_s:
            raise ValueError(f"lease.ttl_s ({self.ttl_s:g}) must exceed twice lease.sync_period_s "
                             f"({self.sync_period_s:g}), or every lease lapses between renewals")
        return self


def _default_classes() -> list[PriorityClassConfig]:
    return [PriorityClassConfig(name="interactive", max_queue=32),
            PriorityClassConfig(name="standard", max_queue=64),
            PriorityClassConfig(name="batch", max_queue=128)]


class AdmissionSection(_Strict):
    """Tenants, token budgets, priorities and overload shedding at the ingress (docs/admission.md)."""

    tenants: list[TenantConfig] = Field(default_factory=list, description="Tenants; with any, every /v1 "
                                        "request needs one of their keys.")
    classes: list[PriorityClassConfig] = Field(
        default_factory=_default_classes, description="Priority classes, highest first: a free slot goes to "
        "the highest class waiting, and when the queues are full a lower class is shed first.")
    default_priority: str = Field("standard", description="Class of the `default` tenant (ingress.api_keys) "
                                  "and of requests when auth is off.")
    max_in_flight: int | None = Field(
        None, ge=1, description="Requests one ingress replica lets through at once (slots); the rest wait "
        "in their class's queue. None: no slots, no queue (budgets and caps still apply).")
    max_queued: int = Field(256, ge=0, description="All classes' queues together, per ingress replica.")
    ttft_deadline_s: float | None = Field(
        None, gt=0, description="Early rejection: a request that would wait for a slot longer than this "
        "(queue ahead x mean service time / slots, plus mean time to first token) gets a 503 with "
        "Retry-After at once. None: off.")
    lease: LeaseSection = Field(default_factory=LeaseSection, description="Token leases shared across ingress replicas.")

    @model_validator(mode="after")
    def _names(self) -> "AdmissionSection":
        classes = [c.name for c in self.classes]
        if not classes:
            raise ValueError("admission.classes needs at least one class")
        if len(set(classes)) != len(classes):
            raise ValueError(f"admission.classes: duplicate class names in {classes}")
        if self.default_priority not in classes:
            raise ValueError(f"admission.default_priority {self.default_priority!r} is not a class; "
                             f"choose one of {classes}")
        seen: dict[str, str] = {}
        names: set[str] = set()
        for t in self.tenants:
            if t.name in RESERVED_TENANTS:
                raise ValueError(f"tenant name {t.name!r} is reserved (reserved: {', '.join(RESERVED_TENANTS)})")
            if t.name in names:
                raise ValueError(f"two tenants are named {t.name!r}")
            names.add(t.name)
            if t.priority not in classes:
                raise ValueError(f"tenant {t.name}: priority {t.priority!r} is not a class; choose one of {classes}")
            for ref in (*t.api_keys, *t.revoked_keys):
                if seen.setdefault(ref, t.name) != t.name:
                    raise ValueError(f"tenants {seen[ref]} and {t.name} share a key ({ref.split(':', 1)[0]}:...); "
                                     "a key belongs to one tenant")
        return self


class AppConfig(_Strict):
    """Everything `pd_serve.app:build_app` needs. Every field is described."""

    # never echo config values in errors: they may hold API keys
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    model: str = Field(..., description="HF model directory or hub id; `tiny://llama` is the offline test model.")
    served_model_name: str | None = Field(None, description="Name clients use in `model`; defaults to `model`.")
    device: Literal["cpu", "gpu"] = Field("cpu", description="Where engines run: vllm-cpu or vllm on GPUs.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="vLLM engine args shared by both tiers.")
    prefill: TierConfig = Field(default_factory=TierConfig, description="The prefill tier (KV producer).")
    decode: TierConfig = Field(default_factory=TierConfig, description="The decode tier (KV consumer, orchestrates requests).")
    kv_transfer: KVTransferSection = Field(default_factory=KVTransferSection, description="How KV moves between tiers.")
    router: RouterSection = Field(default_factory=RouterSection, description="Replica choice and the P/D decision.")
    ingress: IngressSection = Field(default_factory=IngressSection, description="The OpenAI HTTP front.")
    admission: AdmissionSection = Field(default_factory=AdmissionSection,
                                        description="Tenants, API keys, token budgets, priorities (docs/admission.md).")
    replica_cpu_cores: list[int] | None = Field(
        None, description="CPU only: cores the replica processes themselves run on (ingress, control, and each "
        "engine replica's front end once its engine has started), so they stay off the decode engine's core, "
        "as a bare vLLM server's API process does. None: anywhere.")

    @model_validator(mode="after")
    def _cross_field(self) -> "AppConfig":
        for k in self.engine_args:
            if k in _RESERVED_ENGINE_ARGS:
                raise ValueError(f"engine_args.{k} is managed by pd_serve: {_RESERVED_ENGINE_ARGS[k]}")
        check_engine_args(self.engine_args)
        for tier in ("prefill", "decode"):
            t = getattr(self, tier)
            if self.device == "cpu" and (t.num_gpus_per_worker or t.accelerator_type):
                raise ValueError(f"{tier}: device is cpu but num_gpus_per_worker/accelerator_type is set; "
                                 "set device: gpu or remove them")
            if self.device == "gpu" and t.num_gpus_per_worker <= 0:
                raise ValueError(f"{tier}: device is gpu, so set num_gpus_per_worker (usually 1)")
        if self.device == "gpu" and self.kv_transfer.buffer_device == "cpu" and self.kv_transfer.backend == "nixl":
            pass  # host-buffer staging is legal on GPUs (slower); allowed on purpose
        if self.device == "cpu" and self.kv_transfer.buffer_device != "cpu":
            raise ValueError("device is cpu, so kv_transfer.buffer_device must be `cpu`")
        if self.decode.autoscaling is None and self.decode.fixed_replicas(1) < 1:
            raise ValueError("decode needs at least one replica: it serves every request")
        if self.decode.autoscaling is not None and self.decode.autoscaling.min_replicas < 1:
            raise ValueError("decode.autoscaling.min_replicas must be >= 1: decode serves every request")
        prefill_sized = self.prefill.autoscaling is not None or self.prefill.fixed_replicas(1) > 0
        if prefill_sized and self.kv_transfer.backend is None:
            raise ValueError("the prefill tier has replicas but kv_transfer.backend is null: a P/D "
                             "deployment needs a KV connector (e.g. `nixl`), or set prefill.replicas: 0")
        for k in ("block_size", "dtype", "kv_cache_dtype"):
            p = self.prefill.engine_args.get(k, self.engine_args.get(k))
            d = self.decode.engine_args.get(k, self.engine_args.get(k))
            if p != d:
                raise ValueError(
                    f"P/D tiers disagree on {k}: prefill={p!r}, decode={d!r}. KV blocks must have "
                    f"the same layout on both tiers: set `{k}` once in the top-level engine_args")
        from pd_serve.placement import check_placement

        check_placement(self)  # what Ray and vLLM refuse at placement (pd_serve/placement.py)
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def block_size(self) -> int:
        """KV block size of both tiers (equal by validation): as configured, else vLLM's default
        for the device. Set explicitly on the engines so that the routers hash the same blocks."""
        return int(self.engine_args.get("block_size") or self.decode.engine_args.get("block_size")
                   or (16 if self.device == "gpu" else 128))

    def tier_engine_args(self, tier: str) -> dict[str, Any]:
        return {**self.engine_args, **getattr(self, tier).engine_args, "block_size": self.block_size}


def reference_markdown() -> str:
    """The config reference table in docs/config.md, generated from the field descriptions."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                        and issubclass(a, BaseModel)), None)
            key = f"{prefix}{name}" + ("[]" if getattr(ann, "__origin__", None) is list and sub else "")
            if sub is not None and sub is not AutoscalingBounds:
                rows.append(f"| `{key}` | section | | {f.description} |")
                walk(sub, key + ".")
                continue
            if f.is_required():
                default = "required"
            elif f.default_factory is not None:
                default = f"`{f.default_factory()!r}`" if sub is None else ""
            else:
                default = f"`{f.default!r}`"
            tname = ann.__name__ if isinstance(ann, type) else re.sub(r"[\w.]+\.(\w+)", r"\1", str(ann))
            rows.append(f"| `{key}` | {tname.replace('|', 'or')} | {default} | {f.description} |")
            if sub is AutoscalingBounds:
                walk(sub, key + ".")

    walk(AppConfig, "")
    return "\n".join(rows)


def write_reference(path: str = "docs/config.md") -> None:
    """Replace the table between the config-reference markers of `path`."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    p.write_text(text[:i] + reference_markdown() + text[j:])


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        write_reference()
    else:
        print(reference_markdown())
