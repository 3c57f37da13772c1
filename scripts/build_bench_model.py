"""Build the benchmark models: random-weight Qwen2 checkpoints made here, offline, from a fixed seed.

    python scripts/build_bench_model.py [--out benchmarks/.model] [--shape bench|bench-vocab152k|qwen2.5-0.5b]

``bench`` (the default, ~22.9M parameters): hidden 512, 8 layers, 8 heads, 2 KV heads, intermediate
1408, head_dim 64, with the shipped tiny model's tokenizer (assets/tiny-qwen2: vocab 320, Qwen chat
tokens and template) copied next to it. This is the fixed workload of ``benchmarks/``.

``qwen2.5-0.5b`` (~494M parameters): Qwen2.5-0.5B's shape (hidden 896, intermediate 4864, 24 layers,
14 heads, 2 KV heads, vocab 151936, tied embeddings) for the sync-cost benchmark. It keeps the shipped
tokenizer too: its 320 ids are all valid rows of the large embedding, and ids the model samples
beyond them are decoded to nothing, which the weight sync does not care about.

Fixed work per completion: with random weights every one of the 320 tokens is about equally likely,
and the two EOS ids (``<|im_end|>``, ``<|endoftext|>``) would end ~1/3 of 64-token completions early,
at random points. So the EOS rows of the output layer are pointed away from a constant direction of
the final hidden state (``--no-fixed-length`` turns this off): every token embedding gets the same
large value in dimension 0, so after the final RMSNorm that dimension is reliably positive, and the
EOS logits get a large negative weight on it. Every other logit is untouched. Completions then run
to max_new_tokens on every sampler (vLLM, transformers), which makes tokens per second comparable.
The same seed gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_SOURCE = REPO_ROOT / "assets" / "tiny-qwen2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
DEFAULT_OUT = REPO_ROOT / "benchmarks" / ".model"
SEED = 1234

SHAPES: dict[str, dict[str, Any]] = {
    "bench": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    # The bench shape with Qwen2.5's real 151,936-entry output layer (untied; ~178M parameters, 155M of
    # them the embedding and the output layer): the chunked-logprobs memory benchmark.
    "bench-vocab152k": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        head_dim=64,
        max_position_embeddings=256,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        head_dim=64,
        max_position_embeddings=512,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
# How far EOS is pushed down: constant hidden value in dim 0 and the EOS rows' weight on it.
EMBED_OFFSET = 4.0
EOS_WEIGHT = -4.0


def build(out: Path, shape: str = "bench", seed: int = SEED, fixed_length: bool = True) -> Path:
    """Write config, random weights, generation config and the copied tokenizer to `out`."""
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_SOURCE))
    eos_ids = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id})
    settings = dict(SHAPES[shape])
    # The shipped model's vocabulary (320: the tokenizer's 259 ids padded, as Qwen pads its vocab).
    shipped_vocab = json.loads((TOKENIZER_SOURCE / "config.json").read_text())["vocab_size"]
    settings.setdefault("vocab_size", shipped_vocab)
    config = Qwen2Config(
        **settings,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    if fixed_length:
        _suppress_eos(model, eos_ids)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SOURCE / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    (out / "bench_model.json").write_text(
        json.dumps(
            {"shape": shape, "seed": seed, "parameters": params, "fixed_length": fixed_length}, indent=2
        )
        + "\n"
    )
    return out


@torch.no_grad()
def _suppress_eos(model: Qwen2ForCausalLM, eos_ids: list[int]) -> None:
    embed: Any = model.get_input_embeddings()
    head: Any = model.get_output_embeddings()
    embed.weight[:, 0] = EMBED_OFFSET
    # With tied embeddings (the 0.5B shape) this also moves the EOS rows' input embedding in dim 0;
    # the benchmark prompts never contain EOS.
    head.weight[eos_ids, 0] = EOS_WEIGHT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="model directory (default benchmarks/.model)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--no-fixed-length", action="store_true", help="keep EOS as likely as any token (variable lengths)"
    )
    args = parser.parse_args(argv)
    out = args.out or (
        DEFAULT_OUT if args.shape == "bench" else DEFAULT_OUT.with_name(f".model-{args.shape}")
    )
    start = time.perf_counter()
    build(out, args.shape, args.seed, fixed_length=not args.no_fixed_length)
    meta = json.loads((out / "bench_model.json").read_text())
    print(f"{out}: {meta['parameters'] / 1e6:.1f}M parameters ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
