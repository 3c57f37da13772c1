"""Build the shipped tiny Qwen2 model and the two-digit addition task it is trained on.

    python scripts/build_tiny_model.py [--out-model assets/tiny-qwen2] [--out-data assets/arith]

Everything is made here, offline and from fixed seeds: the task splits (``rewards.arithmetic``), a
byte-level Qwen2 tokenizer without merges (Qwen's chat tokens and template), and a 0.67M-parameter
Qwen2 model (head_dim 64, which vLLM's CPU attention kernel needs; grouped-query attention like
real Qwen2, so q and k/v projections differ in shape) trained by SFT for about two minutes on one
CPU thread.

What is reproducible: everything made without float arithmetic is byte-identical on any machine:
the task splits, the tokenizer and chat template, config.json and generation_config.json, and the
weights' names, shapes and dtypes. The weights themselves are byte-identical only on the same machine
(same CPU, torch build and ``NUM_THREADS``): SFT is 1000 float32 AdamW steps, the last bits of every
GEMM and vectorised op follow the kernels MKL and ATen pick for the CPU, and training carries those
differences into every weight. On another CPU the rebuilt model is a sibling of the shipped one: the
same held-out behaviour up to a few rows (tests/integration/test_tiny_model.py states the band;
``MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default`` shows here what another CPU computes).

Why the SFT labels are wrong on purpose: the demo has to show GRPO improving something. A model
that already solves the task leaves RL nothing to do, and one that never produces a right answer
gives every sample in a group the same reward, so every advantage is zero. So the model is taught
a *systematic* mistake it can be talked out of. It first learns clean addition (``clean_steps``),
then, for the rest of training, "carry" problems (ones digits sum to 10 or more, ~45% of pairs)
are labelled with the true sum with probability ``p_correct_on_carry`` and with the "forgot the
carry" sum (47+38 -> 75) otherwise, drawn afresh every time an example is seen; all other problems
stay correctly labelled. The model ends up knowing both answers to a carry problem but preferring
the wrong one: greedy decoding solves the no-carry half of the (balanced) held-out split and
almost none of the rest, while sampling at temperature 1 finds the true sum in a group of 8 for
most carry problems, so group rewards differ and GRPO has a direction to push. Learning to carry
from clean labels first is faster and more reliable than from noisy ones, whose carry signal is
weak. ``p_correct_on_carry`` is 0.3 rather than nearer 0.5 so the preference survives NF4
rounding of the decoder weights (what the QLoRA learner's base sees), which the script checks.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rewards import arithmetic  # noqa: E402  (needs the repo root on sys.path first)

SEED = arithmetic.SEED
# A fixed thread count keeps float reductions in the same order, hence the same bits, on every run
# on one machine (another CPU's kernels round differently; see the module docstring).
# One thread: the matmuls are too small to gain much from two (0.10 vs 0.08 s a step), and on a
# busy machine two spin-waiting threads ran five times slower than one.
NUM_THREADS = 1

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen2's template minus its default system prompt: a bare user turn renders with no system turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MAX_POSITIONS = 128
HEAD_DIM = 64  # vLLM's CPU attention kernel rejects small head sizes such as 16


@dataclass(frozen=True)
class TrainSettings:
    """Tuned on CPU: batch 64 learned clean addition in half the compute batch 128 needed."""

    steps: int = 1000
    clean_steps: int = 600  # clean labels first, so the model can carry before it learns to forget
    p_correct_on_carry: float = 0.3
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer with no merges: one token per byte, plus the three chat tokens.

    It has to be a ``Qwen2Tokenizer``: for ``model_type: qwen2`` transformers 5 (and so vLLM)
    loads that class whatever tokenizer_config.json names, and it rebuilds the pipeline from the
    saved vocab with Qwen's byte-level pre-tokenizer, which would garble any other vocabulary.
    With every byte in the vocab any text tokenizes; ASCII characters, newline included, are single
    tokens (id = byte + 3), and the answers the model writes are one token per digit.
    """
    byte_chars = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *(byte_chars[b] for b in range(256))])}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,  # type: ignore[arg-type]  # as in Qwen2's own tokenizer_config.json
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )
    # eos and pad are registered as special by the constructor; <|im_start|> needs it too to stay atomic.
    tokenizer.add_tokens([AddedToken(IM_START, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(ids, int):
        raise KeyError(f"{token!r} is not a single token of this tokenizer")
    return ids


def build_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    # Rounded up to a multiple of 64 rows; the extra ids never occur in training, so sampling one
    # is negligible (at most 3e-5 probability at answer positions when measured).
    vocab_size = 64 * math.ceil(len(tokenizer) / 64)
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=2 * HEAD_DIM,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=token_id(tokenizer, IM_END),
        pad_token_id=token_id(tokenizer, ENDOFTEXT),
        dtype="float32",
    )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, questions: list[str]) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


class SftData:
    """Pre-tokenized train pairs; each batch re-draws the noisy carry labels (see module doc).

    Every prompt starts with the same 14 tokens (``<|im_start|>user``, newline, ``What is ``);
    ``prefix`` holds them once so training runs that part at batch size 1, a third less compute.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pairs: list[arithmetic.Pair]) -> None:
        self.pad_id = token_id(tokenizer, ENDOFTEXT)
        im_end = token_id(tokenizer, IM_END)
        prompts = prompt_ids(tokenizer, [arithmetic.question(a, b) for a, b in pairs])
        n = common_prefix_len(prompts)
        self.prefix = prompts[0][:n]
        self.prompt_tails = [p[n:] for p in prompts]
        self.right = [
            [*tokenizer.encode(arithmetic.answer(a, b), add_special_tokens=False), im_end] for a, b in pairs
        ]
        self.wrong = [
            [*tokenizer.encode(arithmetic.forgot_carry_answer(a, b), add_special_tokens=False), im_end]
            for a, b in pairs
        ]
        self.is_carry = [arithmetic.carry(a, b) for a, b in pairs]

    def batch(
        self, gen: torch.Generator, size: int, p_correct_on_carry: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids after the shared prefix, and a mask of the positions whose *next* token is trained on."""
        idx = torch.randint(len(self.prompt_tails), (size,), generator=gen).tolist()
        coins = torch.rand(size, generator=gen).tolist()
        seqs, starts = [], []
        for i, coin in zip(idx, coins, strict=True):
            target = self.right[i] if not self.is_carry[i] or coin < p_correct_on_carry else self.wrong[i]
            seqs.append(self.prompt_tails[i] + target)
            starts.append(len(self.prompt_tails[i]))
        width = max(map(len, seqs))
        ids_B_T = torch.full((size, width), self.pad_id, dtype=torch.long)
        loss_mask_B_T = torch.zeros((size, width), dtype=torch.bool)
        for row, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            ids_B_T[row, : len(seq)] = torch.tensor(seq)
            # Position t predicts token t+1: train on predicting the answer and <|im_end|>.
            loss_mask_B_T[row, start - 1 : len(seq) - 1] = True
        return ids_B_T, loss_mask_B_T


def common_prefix_len(seqs: list[list[int]]) -> int:
    shortest = min(map(len, seqs))
    n = 0
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    # Keep a token of every prompt outside the prefix so the first answer token has a predictor.
    return min(n, shortest - 1)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def forward_after_prefix(model: Qwen2ForCausalLM, prefix: list[int], ids_B_T: torch.Tensor) -> torch.Tensor:
    """Logits for ``ids_B_T`` as if each row were preceded by ``prefix``; the prefix runs once.

    Rows are right-padded: causal attention never lets a pad influence a real position.
    """
    cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
    cache.batch_repeat_interleave(ids_B_T.shape[0])
    return model(input_ids=ids_B_T, past_key_values=cache).logits


def train(model: Qwen2ForCausalLM, data: SftData, s: TrainSettings, log_every: int = 100) -> None:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=s.weight_decay)
    model.train()
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        p_correct = 1.0 if step < s.clean_steps else s.p_correct_on_carry
        ids_B_T, mask_B_T = data.batch(gen, s.batch_size, p_correct)
        logits_B_T_V = forward_after_prefix(model, data.prefix, ids_B_T)
        nll_B_T = F.cross_entropy(logits_B_T_V[:, :-1].transpose(1, 2), ids_B_T[:, 1:], reduction="none")
        loss = (nll_B_T * mask_B_T[:, :-1]).sum() / mask_B_T.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == s.steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step, s):.2e}", flush=True)
    model.eval()


@torch.no_grad()
def sample_answers(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    n: int = 1,
    temperature: float = 0.0,
    batch_size: int = 512,
) -> list[list[str]]:
    """``n`` answers per question: the text before ``<|im_end|>``; greedy when temperature is 0."""
    prompts = [p for p in prompt_ids(tokenizer, questions) for _ in range(n)]
    pad = token_id(tokenizer, ENDOFTEXT)
    stop = {"max_new_tokens": 6, "eos_token_id": [token_id(tokenizer, IM_END), pad], "pad_token_id": pad}
    if temperature:
        config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **stop)
    else:
        config = GenerationConfig(do_sample=False, **stop)
    texts: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # type: ignore[misc]
        for text in tokenizer.batch_decode(out[:, width:].tolist(), skip_special_tokens=False):
            texts.append(text.split(IM_END)[0].replace(ENDOFTEXT, "").strip())
    return [texts[i : i + n] for i in range(0, len(texts), n)]


def hits(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[arithmetic.Row],
    k: int,
    temperature: float,
) -> list[list[bool]]:
    got = sample_answers(model, tokenizer, [r["question"] for r in rows], n=k, temperature=temperature)
    return [[a == r["answer"] for a in g] for g, r in zip(got, rows, strict=True)]


def mean(xs: list[bool] | list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def nf4_roundtrip(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """A copy whose decoder-layer linear weights are dequant(nf4(W)), as the QLoRA base sees them."""
    import bitsandbytes.functional as bnbf  # only this check needs bitsandbytes

    noisy = copy.deepcopy(model)
    for layer in noisy.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                packed, state = bnbf.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4")
                module.weight.data = bnbf.dequantize_4bit(packed, state).to(module.weight.dtype)
    return noisy


def save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        # Either token ends an answer; no sampling defaults, since vLLM would adopt them.
        eos_token_id=[token_id(tokenizer, IM_END), token_id(tokenizer, ENDOFTEXT)],
        pad_token_id=token_id(tokenizer, ENDOFTEXT),
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, test: list[arithmetic.Row]) -> None:
    torch.manual_seed(SEED)
    is_carry = [arithmetic.carry(*arithmetic.parse_question(r["question"])) for r in test]
    greedy = [h[0] for h in hits(model, tokenizer, test, k=1, temperature=0.0)]
    nf4 = [h[0] for h in hits(nf4_roundtrip(model), tokenizer, test, k=1, temperature=0.0)]
    sampled = hits(model, tokenizer, test, k=8, temperature=1.0)
    on_carry = [h for h, c in zip(sampled, is_carry, strict=True) if c]
    print(f"held-out rows: {len(test)} ({sum(is_carry)} with a carry)")
    print(f"fp32 greedy accuracy: {mean(greedy):.3f}")
    print(
        f"  carry rows {mean([g for g, c in zip(greedy, is_carry, strict=True) if c]):.3f}, "
        f"no-carry rows {mean([g for g, c in zip(greedy, is_carry, strict=True) if not c]):.3f}"
    )
    print(f"NF4 greedy accuracy: {mean(nf4):.3f}")
    print(f"fp32 T=1 pass@8: {mean([any(h) for h in sampled]):.3f}")
    print(
        f"fp32 T=1 per-sample accuracy: {mean([mean(h) for h in sampled]):.3f} "
        f"(carry rows {mean([mean(h) for h in on_carry]):.3f})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-model", type=Path, default=REPO_ROOT / "assets" / "tiny-qwen2")
    parser.add_argument("--out-data", type=Path, default=REPO_ROOT / "assets" / "arith")
    parser.add_argument(
        "--skip-eval", action="store_true", help="only build and save (used by the rebuild test)"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    arithmetic.write_splits(args.out_data, SEED)
    tokenizer = build_tokenizer()
    model = Qwen2ForCausalLM(build_config(tokenizer))
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    data = SftData(tokenizer, arithmetic.split_pairs(SEED)["train"])
    t_train = time.perf_counter()
    train(model, data, TrainSettings())
    print(f"training time: {time.perf_counter() - t_train:.1f}s")
    save(model, tokenizer, args.out_model)
    print(f"model.safetensors sha256: {sha256(args.out_model / 'model.safetensors')}")
    if not args.skip_eval:
        evaluate(model, tokenizer, arithmetic.read_split(args.out_data / "test.jsonl"))
    print(f"total build time: {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
