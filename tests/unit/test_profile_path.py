"""benchmarks/profile_path.py's pure parts: py-spy raw parsing, path normalising, bucketing, summaries."""

from __future__ import annotations

from pathlib import Path

from benchmarks.profile_path import (
    BLOCKING_LEAF, BUCKET_NAMES, BUCKETS, OTHER, Frame, deployment_of, frame_bucket, norm_path, parse_frame, parse_raw,
    process_label, stack_bucket, summarize, thread_group,
)

ROOT = "/repo"
SP = "/repo/.venv/lib/python3.11/site-packages"
LIB = "/usr/lib/python3.11"
LOOP = f"_run_once ({LIB}/asyncio/base_events.py:1922);_run ({LIB}/asyncio/events.py:84)"
MAIN = "thread (0x7f00aa): MainThread"

# 52 samples: metrics 10, pd_serve 6, event_loop 4, thread_pool 8 + 2, ray_core 7 + 3, serialization 3,
# tokenizer 2, http 5, vllm 2. Blocking leaves: EpollSelector.select 4, _worker 2.
RAW = "\n".join([
    f"{MAIN};{LOOP};handle_request ({SP}/ray/serve/_private/replica.py:100);"
    f"Metric._record ({SP}/ray/util/metrics.py:50) 10",
    f"{MAIN};{LOOP};DecodeServer.generate ({ROOT}/pd_serve/servers.py:200);dumps ({LIB}/json/__init__.py:231);"
    f"JSONEncoder.encode ({LIB}/json/encoder.py:200) 4",
    f"{MAIN};{LOOP};DecodeServer.generate ({ROOT}/pd_serve/servers.py:201);dumps ({LIB}/json/__init__.py:231);"
    f"JSONEncoder.encode ({LIB}/json/encoder.py:203) 2",
    f"{MAIN};_run_once ({LIB}/asyncio/base_events.py:1922);EpollSelector.select ({LIB}/selectors.py:468) 4",
    f"thread (0x7f00bb): ThreadPoolExecutor-0_1;Thread._bootstrap ({LIB}/threading.py:1002);"
    f"_worker ({LIB}/concurrent/futures/thread.py:83);_WorkItem.run ({LIB}/concurrent/futures/thread.py:58) 8",
    f"thread (0x7f00bb): ThreadPoolExecutor-0_1;Thread._bootstrap ({LIB}/threading.py:1002);"
    f"_worker ({LIB}/concurrent/futures/thread.py:81) 2",
    f"{MAIN};{LOOP};ActorReplicaResult.__anext__ ({SP}/ray/serve/_private/replica_result.py:10);"
    f"ObjectRefGenerator._next_async ({SP}/ray/_private/object_ref_generator.py:20) 7",
    f"{MAIN};{LOOP};handle_request ({SP}/ray/serve/_private/replica.py:101);"
    f"ActorHandle._actor_method_call ({SP}/ray/actor.py:1500) 3",
    f"{MAIN};{LOOP};OpenAIServingCompletion.create_completion ({SP}/vllm/entrypoints/openai/serving_completion.py:300);"
    f"BaseModel.model_validate ({SP}/pydantic/main.py:10) 3",
    f"thread (0x7f00cc): Thread-3 (worker);Thread.run ({LIB}/threading.py:982);"
    f"PreTrainedTokenizerBase.encode ({SP}/transformers/tokenization_utils_base.py:2500) 2",
    f"{MAIN};{LOOP};HttpToolsProtocol.data_received ({SP}/uvicorn/protocols/http/httptools_impl.py:100) 5",
    f"{MAIN};{LOOP};OpenAIServingCompletion.create_completion ({SP}/vllm/entrypoints/openai/serving_completion.py:310);"
    f"IncrementalDetokenizer.update ({SP}/vllm/v1/engine/detokenizer.py:90) 2",
    "",
    "not a stack line",
    "",
])


def test_parse_frame_and_raw_lines() -> None:
    assert parse_frame(f"dumps ({LIB}/json/__init__.py:231)") == Frame("dumps", f"{LIB}/json/__init__.py", 231)
    assert parse_frame("<lambda> (/x/a (b).py:7)") == Frame("<lambda>", "/x/a (b).py", 7)
    assert parse_frame("native_fn") == Frame("native_fn", "", None)
    assert parse_frame("f (<string>)") == Frame("f", "<string>", None)
    stacks = parse_raw(RAW)
    assert len(stacks) == 12
    assert sum(s.count for s in stacks) == 52
    assert stacks[0].thread == "MainThread"
    assert stacks[0].count == 10
    assert [f.func for f in stacks[0].frames] == ["_run_once", "_run", "handle_request", "Metric._record"]
    assert stacks[4].thread == "ThreadPoolExecutor-0_1"
    assert stacks[4].frames[-1] == Frame("_WorkItem.run", f"{LIB}/concurrent/futures/thread.py", 58)
    # No --threads: no thread element; a --subprocesses process element is dropped.
    plain = parse_raw("f (/a/b.py:1);g (/a/c.py:2) 3\nprocess 12:python x.py;thread (123): T;h (/a/d.py:4) 1")
    assert [(s.thread, len(s.frames), s.count) for s in plain] == [(None, 2, 3), ("T", 1, 1)]
    unnamed = parse_raw("thread (27608);f (/a/b.py:1) 2\nthread (27608) 5")
    assert [(s.thread, len(s.frames), s.count) for s in unnamed] == [("", 1, 2), ("", 0, 5)]


def test_norm_path_and_buckets() -> None:
    assert norm_path(f"{SP}/ray/serve/_private/router.py", ROOT) == "ray/serve/_private/router.py"
    assert norm_path("/usr/lib/python3/dist-packages/yaml/x.py", ROOT) == "yaml/x.py"
    assert norm_path(f"{ROOT}/kv_transfer/cpu_plugin.py", ROOT) == "kv_transfer/cpu_plugin.py"
    assert norm_path(f"{LIB}/asyncio/events.py", ROOT) == "asyncio/events.py"
    assert norm_path("/tmp/script.py", ROOT) == "/tmp/script.py"
    assert frame_bucket("ray/util/metrics.py") == "metrics"
    assert frame_bucket("ray/serve/_private/router.py") == "ray_serve"
    assert frame_bucket("ray/llm/_internal/serve/x.py") == "ray_serve"
    assert frame_bucket("ray/_private/object_ref_generator.py") == "ray_core"
    assert frame_bucket("python/ray/_raylet.pyx") == "ray_core"
    assert frame_bucket("vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py") == "vllm"
    assert frame_bucket("vllm/ray/lazy_utils.py") == "vllm"
    assert frame_bucket("kv_transfer/cpu_plugin.py") == "pd_serve"
    assert frame_bucket("scheduler/index.py") == "pd_serve"
    assert frame_bucket("starlette/routing.py") == "http"
    assert frame_bucket("tokenizers/__init__.py") == "tokenizer"
    assert frame_bucket("msgspec/__init__.py") == "serialization"
    assert frame_bucket("zmq/sugar/socket.py") == "zmq"
    assert frame_bucket("asyncio/events.py") is None
    assert frame_bucket("<frozen importlib._bootstrap>") is None
    assert frame_bucket("torch/nn/modules/module.py") == OTHER
    assert frame_bucket("/tmp/script.py") == OTHER
    assert stack_bucket(["threading.py", "asyncio/events.py", "json/encoder.py"]) == ("event_loop", 1)
    assert stack_bucket(["threading.py", "queue.py"]) == ("thread_pool", 1)
    assert stack_bucket(["json/encoder.py"]) == (OTHER, None)
    assert stack_bucket([]) == (OTHER, None)
    assert stack_bucket(["ray/serve/_private/replica.py", "pd_serve/servers.py", "json/encoder.py"]) == ("pd_serve", 1)
    # Thread rules apply only to stacks of standard-library frames alone: Ray's (uvloop) loop thread.
    assert stack_bucket(["threading.py"], "AsyncIO Thread: default") == ("event_loop", None)
    # A thread without a name (native, e.g. Ray's core-worker threads), even with no Python frame.
    assert stack_bucket([], "") == ("native_thread", None)
    assert stack_bucket(["json/encoder.py"], "") == ("native_thread", None)
    assert stack_bucket(["ray/_private/serialization.py"], "") == ("ray_core", 0)
    assert stack_bucket(["threading.py", "ray/_private/worker.py"], "AsyncIO Thread: default") == ("ray_core", 1)
    assert stack_bucket(["threading.py", "concurrent/futures/thread.py"], "ThreadPoolExecutor-6_0") == \
        ("thread_pool", 1)
    # One table: every bucket named in it, in order, once; "other" last.
    assert BUCKET_NAMES == list(dict.fromkeys(b[0] for b in BUCKETS)) + ["other"]
    assert len(set(BUCKET_NAMES)) == len(BUCKET_NAMES) == 13


def test_summarize_exact_shares() -> None:
    s = summarize(parse_raw(RAW), root=ROOT, top=8)
    assert s["samples"] == 52
    assert (s["blocking_leaf_samples"], s["blocking_leaf_pct"]) == (6, 11.5)  # select 4, _worker 2
    shares = {b: (v["samples"], v["pct"]) for b, v in s["buckets"].items()}
    assert shares == {
        "metrics": (10, 19.2), "ray_serve": (0, 0.0), "ray_core": (10, 19.2), "http": (5, 9.6),
        "vllm": (2, 3.8), "tokenizer": (2, 3.8), "serialization": (3, 5.8), "pd_serve": (6, 11.5),
        "zmq": (0, 0.0), "native_thread": (0, 0.0), "event_loop": (4, 7.7), "thread_pool": (10, 19.2),
        "other": (0, 0.0),
    }
    assert sum(v["samples"] for v in s["buckets"].values()) == 52
    # Shares among the 46 samples whose leaf does not block.
    assert {b: v["busy_pct"] for b, v in s["buckets"].items()} == {
        "metrics": 21.7, "ray_serve": 0.0, "ray_core": 21.7, "http": 10.9, "vllm": 4.3, "tokenizer": 4.3,
        "serialization": 6.5, "pd_serve": 13.0, "zmq": 0.0, "native_thread": 0.0, "event_loop": 0.0,
        "thread_pool": 17.4, "other": 0.0,
    }
    # The frame that decided the bucket: pd_serve's generate (json is transparent), lines merged.
    assert s["buckets"]["pd_serve"]["top_frames"] == [
        {"frame": "DecodeServer.generate (pd_serve/servers.py)", "samples": 6, "pct": 11.5}]
    assert s["buckets"]["ray_core"]["top_frames"] == [
        {"frame": "ObjectRefGenerator._next_async (ray/_private/object_ref_generator.py)", "samples": 7, "pct": 13.5},
        {"frame": "ActorHandle._actor_method_call (ray/actor.py)", "samples": 3, "pct": 5.8}]
    assert s["buckets"]["thread_pool"]["top_frames"] == [
        {"frame": "_WorkItem.run (concurrent/futures/thread.py)", "samples": 8, "pct": 15.4},
        {"frame": "_worker (concurrent/futures/thread.py)", "samples": 2, "pct": 3.8}]
    assert [(f["frame"], f["samples"], f["pct"]) for f in s["top_self"]] == [
        ("Metric._record (ray/util/metrics.py)", 10, 19.2),
        ("_WorkItem.run (concurrent/futures/thread.py)", 8, 15.4),
        ("ObjectRefGenerator._next_async (ray/_private/object_ref_generator.py)", 7, 13.5),
        ("JSONEncoder.encode (json/encoder.py)", 6, 11.5),
        ("HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py)", 5, 9.6),
        ("EpollSelector.select (selectors.py)", 4, 7.7),
        ("ActorHandle._actor_method_call (ray/actor.py)", 3, 5.8),
        ("BaseModel.model_validate (pydantic/main.py)", 3, 5.8),
    ]
    incl = {f["frame"]: (f["samples"], f["pct"]) for f in s["top_inclusive"]}
    assert incl["_run_once (asyncio/base_events.py)"] == (40, 76.9)
    assert incl["_run (asyncio/events.py)"] == (36, 69.2)
    assert incl["handle_request (ray/serve/_private/replica.py)"] == (13, 25.0)
    assert s["top_inclusive"][0]["frame"] == "_run_once (asyncio/base_events.py)"
    assert s["threads"] == {"MainThread": {"samples": 40, "pct": 76.9},
                            "ThreadPoolExecutor-N_N": {"samples": 10, "pct": 19.2},
                            "Thread-N (worker)": {"samples": 2, "pct": 3.8}}


def test_blocking_leaves() -> None:
    blocking = ["EpollSelector.select (selectors.py)", "Condition.wait (threading.py)", "Event.wait (threading.py)",
                "_worker (concurrent/futures/thread.py)", "Poller.poll (zmq/sugar/poll.py)",
                "Socket.poll (zmq/sugar/socket.py)"]
    busy = ["_WorkItem.run (concurrent/futures/thread.py)", "Thread.run (threading.py)",
            "Socket.send (zmq/sugar/socket.py)", "JSONEncoder.encode (json/encoder.py)",
            "Worker.main_loop (ray/_private/worker.py)"]
    assert [bool(BLOCKING_LEAF.match(k)) for k in blocking + busy] == [True] * 6 + [False] * 5


def test_summarize_empty_and_a_file(tmp_path: Path) -> None:
    s = summarize([], root=ROOT)
    assert s["samples"] == 0 and s["top_self"] == [] and s["buckets"]["other"]["pct"] == 0.0
    f = tmp_path / "c1_Ingress.raw"
    f.write_text(RAW)
    assert summarize(parse_raw(f.read_text()), root=ROOT)["buckets"]["http"]["pct"] == 9.6


def test_process_labels() -> None:
    assert deployment_of("ray::ServeReplica:pd_serve:DecodeServer.generate") == "DecodeServer"
    assert process_label("ray::ServeReplica:pd_serve:Ingress") == "Ingress replica"
    assert process_label("ray::ServeReplica:pd_serve:PrefillServer.initialize_and_get_metadata") == \
        "PrefillServer replica"
    assert process_label("ray::ProxyActor") == "Serve proxy"
    assert process_label("ray::ServeController.listen_for_change") == "Serve controller"
    assert process_label("VLLM::Worker", ["VLLM::EngineCore", "ray::ServeReplica:pd_serve:DecodeServer", "raylet"]) == \
        "Worker [DecodeServer]"
    assert process_label("VLLM::EngineCore") == "EngineCore"
    assert process_label("ray::IDLE") == "ray::IDLE"
    assert process_label("/repo/.venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x=1") == "raylet"
    assert process_label("/repo/.venv/bin/python /repo/.venv/bin/serve run /tmp/x/tiny-cpu.yaml") == \
        "serve run (launcher)"
    assert process_label("/repo/.venv/bin/python -u /repo/.venv/lib/ray/dashboard/agent.py --x") == "agent.py"
    assert thread_group("") == "(unnamed)"
    assert thread_group(None) == "(no thread information)"


def test_readme_lists_the_bucket_rules() -> None:
    """benchmarks/README.md's bucket table gives every rule of BUCKETS as the code has it."""
    readme = (Path(__file__).resolve().parents[2] / "benchmarks" / "README.md").read_text()
    for bucket, kind, rx, _ in BUCKETS:
        row = f"| `{bucket}` | {kind} | `" + rx.replace("|", "\\|") + "`"  # a table cell escapes its |
        assert row in readme, row
