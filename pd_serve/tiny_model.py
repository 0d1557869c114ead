"""Build the tiny test model offline and deterministically.

A random-weight Llama (hidden 256, 2 layers, 4 heads, 2 KV heads, vocab 1024, fp32) with a
byte-level BPE tokenizer trained locally on generated text, BOS/EOS/eot specials and a
Llama-3-style chat template. No hub access: everything is generated from a seed.

    python -m pd_serve.tiny_model [--preset llama|llama-large] [--out DIR] [--seed N] [--force]

The result is a normal Hugging Face model directory: vLLM loads it like any other model.
The quick start, the tests and the benchmarks all use it; a user points ``model`` at any
other HF directory or hub id instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from pathlib import Path

TINY_URI = "tiny://llama"
# name -> LlamaConfig sizes. "llama" is the test/quick-start model; "llama-large" makes prefill
# cost real time on a CPU (~18M params), so that benchmarks can see what a prefix hit saves.
PRESETS = {
    "llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "llama-large": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2),
}
DEFAULT_SEED = 1234
VOCAB_SIZE = 1024
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
            "<|start_header_id|>", "<|end_header_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_WORDS = ("the a an of to in on for with and or but not is are was were be been cache block "
          "token prefill decode engine model request server replica transfer memory layer head "
          "router prefix hash event stream batch queue latency scale node cluster gpu cpu kv "
          "value key attention sequence prompt answer question user system assistant hello world "
          "data time fast slow small large first last next each every some many few one two three").split()


def default_dir(preset: str = "llama") -> Path:
    root = os.environ.get("PD_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pd_serve")
    return Path(root) / f"tiny-{preset}"


def resolve_model(model: str) -> str:
    """Map ``tiny://<preset>`` to the built directory's absolute path; pass anything else through.

    Raises FileNotFoundError with the command to run when that model is not built.
    Both tiers must receive the *same* string: NIXL's handshake hashes the model path.
    """
    if not model.startswith("tiny://"):
        return model
    preset = model.removeprefix("tiny://")
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model {model!r}; choose one of {['tiny://' + p for p in PRESETS]}")
    path = default_dir(preset)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"tiny model not built at {path}: run `python -m pd_serve.tiny_model --preset {preset}`"
            + (" (or `make model`)" if preset == "llama" else ""))
    return str(path.resolve())


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 24)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines


def build(out: Path, seed: int = DEFAULT_SEED, force: bool = False, preset: str = "llama") -> Path:
    out = Path(out)
    stamp = out / ".pd_serve_build.json"
    if stamp.exists() and not force and json.loads(stamp.read_text()).get("seed") == seed:
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[1])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, **PRESETS[preset], head_dim=64, max_position_embeddings=2048,
        initializer_range=0.2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id, eos_token_id=[fast.eos_token_id, fast.convert_tokens_to_ids("<|eot_id|>")],
        pad_token_id=fast.pad_token_id, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    # generation_config: greedy is decided per request; keep the file minimal and deterministic.
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16]
    stamp.write_text(json.dumps({"seed": seed, "weights_sha256_16": digest}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama")
    ap.add_argument("--out", type=Path, default=None, help="default: the cache folder of the preset")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    path = build(a.out or default_dir(a.preset), a.seed, a.force, a.preset)
    print(path)


if __name__ == "__main__":
    main()
