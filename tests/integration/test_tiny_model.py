"""The shipped tiny model: loadable with plain transformers, Qwen-style chat, and RL headroom.

The accuracy band is the demo's contract: below 10% GRPO groups would rarely contain a right
answer, above 60% there is little left to improve (see scripts/build_tiny_model.py).

The rebuild reproduces bytes only where no float arithmetic is involved (data splits, tokenizer,
config files, the weights' names and shapes). The weights come out of 1000 float32 AdamW steps, whose
last bits follow the CPU's kernels, so on another machine they differ everywhere; what is compared
there is behaviour: which held-out rows greedy decoding gets right, against the shipped model.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bounds import within
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from rewards import arithmetic

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "assets" / "tiny-qwen2"
DATA_DIR = ROOT / "assets" / "arith"
WEIGHTS = "model.safetensors"
# Retraining under other float kernels re-draws the SFT trajectory's rounding, and a few held-out rows
# change their greedy verdict. Measured on this project's machine: 5 of 300 rows (5 of the 150 carry
# rows, none of the others) under MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default, 4 of 300 under
# ATEN_CPU_CAPABILITY=avx2. Model: each row flips independently with probability q = 0.05 (1.5x the
# worst measured rate, 5/150); the flipped fraction of n rows then stays below q + 4·sqrt(q / n) but
# for odds of 3e-5. The fraction bounds how far accuracy moves, overall and on either half.
FLIP_RATE = 0.05


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    return text


def test_tokenizer_chat_template_and_stop_ids() -> None:
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    gen = GenerationConfig.from_pretrained(MODEL_DIR)
    im_end, endoftext = (tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))

    assert (
        render(tok, "What is 47+38?") == "<|im_start|>user\nWhat is 47+38?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert gen.eos_token_id == [im_end, endoftext]
    assert gen.pad_token_id == endoftext
    # Special tokens are atomic, newline is a token, and text round-trips through ids.
    ids = tok.encode("<|im_start|>user\n12+3=15.<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == im_end
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] in ids
    assert tok.decode(ids) == "<|im_start|>user\n12+3=15.<|im_end|>"


def test_config_fits_vllm_cpu() -> None:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert head_dim == 64  # vLLM's CPU attention kernel rejects 16
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(AutoTokenizer.from_pretrained(MODEL_DIR))
    assert not cfg.tie_word_embeddings


def test_shipped_splits_are_disjoint() -> None:
    splits = {name: arithmetic.read_split(DATA_DIR / f"{name}.jsonl") for name in arithmetic.SPLITS}
    assert len(splits["train"]) >= 2000 and len(splits["test"]) == arithmetic.N_TEST
    train_q = {r["question"] for r in splits["train"]}
    assert not train_q & {r["question"] for r in splits["test"]}
    assert splits == arithmetic.make_problems(arithmetic.SEED)  # the files are what the seed makes


@torch.no_grad()
def greedy_verdicts(model_dir: Path, rows: list[arithmetic.Row]) -> list[bool]:
    """Whether greedy decoding answers each held-out row right."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tok(
        [render(tok, r["question"]) for r in rows],
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,
    )
    out = model.generate(**batch, do_sample=False, max_new_tokens=6)  # eos/pad from generation_config
    completions = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=False)
    answers = [c.split("<|im_end|>")[0].strip() for c in completions]
    return [a == r["answer"] for a, r in zip(answers, rows, strict=True)]


@pytest.mark.numeric  # greedy argmaxes of float32 logits: the band must hold under any kernels
def test_greedy_heldout_accuracy_leaves_room_for_rl() -> None:
    verdicts = greedy_verdicts(MODEL_DIR, arithmetic.read_split(DATA_DIR / "test.jsonl"))
    acc = sum(verdicts) / len(verdicts)
    assert 0.10 <= acc <= 0.60, f"held-out greedy accuracy {acc:.3f} is outside the RL-headroom band"


# Not `numeric`: under the forced kernels MKL's compatible path doubles the ~2.5 min build, more than
# the second CI pass can spend; FLIP_RATE above was measured by rebuilding under them (and another).
@pytest.mark.slow
def test_rebuild_matches_the_shipped_model(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "build_tiny_model.py"),
            "--out-model",
            str(tmp_path / "model"),
            "--out-data",
            str(tmp_path / "data"),
            "--skip-eval",
        ],
        check=True,
        cwd=ROOT,
        timeout=900,
    )
    # made without float arithmetic: byte for byte on any machine
    shipped = sorted(p.name for p in MODEL_DIR.iterdir())
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == shipped
    for name in shipped:
        if name != WEIGHTS:
            assert sha256(tmp_path / "model" / name) == sha256(MODEL_DIR / name), name
    for name in arithmetic.SPLITS:
        assert sha256(tmp_path / "data" / f"{name}.jsonl") == sha256(DATA_DIR / f"{name}.jsonl"), name
    with (
        safe_open(tmp_path / "model" / WEIGHTS, "pt") as ours,
        safe_open(MODEL_DIR / WEIGHTS, "pt") as theirs,
    ):
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for key in theirs.keys():  # noqa: SIM118  (safe_open handles are not mappings)
            a, b = ours.get_slice(key), theirs.get_slice(key)
            assert (a.get_shape(), a.get_dtype()) == (b.get_shape(), b.get_dtype()), key

    # made by float32 training: the same behaviour, row by row, within the flip model
    rows = arithmetic.read_split(DATA_DIR / "test.jsonl")
    rebuilt, reference = greedy_verdicts(tmp_path / "model", rows), greedy_verdicts(MODEL_DIR, rows)
    is_carry = [arithmetic.carry(*arithmetic.parse_question(r["question"])) for r in rows]
    for half, members in (
        ("all", [True] * len(rows)),
        ("carry", is_carry),
        ("no-carry", [not c for c in is_carry]),
    ):
        picked = [i for i, m in enumerate(members) if m]
        flipped = sum(rebuilt[i] != reference[i] for i in picked) / len(picked)
        within(
            f"{half} rows whose greedy verdict changed",
            flipped,
            FLIP_RATE + 4 * math.sqrt(FLIP_RATE / len(picked)),
        )
    # the demo's contract holds for the rebuilt model too
    acc = sum(rebuilt) / len(rows)
    assert 0.10 <= acc <= 0.60, (
        f"rebuilt model's held-out greedy accuracy {acc:.3f} is outside the RL-headroom band"
    )
