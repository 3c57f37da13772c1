"""The FLOP count behind the benchmarks' "how far from the limit" table, on a shape small enough to do by hand."""

from __future__ import annotations

from benchmarks.common import WORKLOAD
from benchmarks.limits import useful_flops

# one layer; hidden 4, 2 query heads and 1 KV head of dim 2, MLP 8, vocabulary 10
SHAPE = {
    "hidden_size": 4,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "vocab_size": 10,
}


def test_useful_flops_by_hand() -> None:
    assert (WORKLOAD.group_size, WORKLOAD.lora_rank) == (8, 16)
    # weights a token meets: q 4x4 + k, v 4x2 each + o 4x4 + MLP 3 x 4x8 + LM head 10x4 = 184
    # LoRA r=16 factors: 16 x [(4+4) + 2(4+2) + (4+4) + 2(4+8) + (8+4)] = 16 x 64 = 1024
    # tokens fed: the prompt once (3), then 2 of each 3-token completion x 8 samples = 16
    # attention: 4 x layers x (heads x head_dim = 4) x mean context: prompt 3/2, completions 3 + 3/2
    linear = 2 * 184 * (3 + 16)
    lora = 2 * 1024 * (3 + 16)
    attention = 4 * 4 * 1.5 * 3 + 4 * 4 * 4.5 * 16
    flops = useful_flops(SHAPE, prompt_lens=[3], completion_len=3.0)
    assert flops["generate"] == linear + lora + attention == 47128
    # backward: frozen layers' input gradients (x1), adapter and attention (x2)
    assert flops["train"] == 2 * linear + 3 * lora + 3 * attention == 134392
