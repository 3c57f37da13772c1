"""A worker_merge base update crosses Ray's wire format intact: packed uint8 NF4 codes and bitsandbytes'
packed quantization state travel as out-of-band buffers and rebuild the same dequantized weight.

Byte identity: dequantize_4bit runs on identical bytes with the same kernel on both sides of the
round trip, so there is no float arithmetic that could differ.
"""

from __future__ import annotations

import pickle

import torch

from grpo_ray import merge_math
from grpo_ray.checksum import weights_checksum
from grpo_ray.records import WeightUpdate


def test_packed_nf4_base_round_trips_out_of_band() -> None:
    import bitsandbytes.functional as bnbf

    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    codes, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    tensors = [("m.weight", codes), *merge_math.pack_quant_state("m.weight", state)]
    assert codes.dtype == torch.uint8 and {t.dtype for _, t in tensors} >= {torch.uint8, torch.float32}
    update = WeightUpdate(3, "worker_merge", tensors, weights_checksum(tensors), base_weights=True)
    update.merge_modules, update.keep_base = ["m"], ["m"]

    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(update, protocol=5, buffer_callback=buffers.append)
    received = pickle.loads(stream, buffers=buffers)

    assert sum(memoryview(b).nbytes for b in buffers) == update.num_bytes  # no tensor bytes in the stream
    assert weights_checksum(received.tensors) == update.checksum
    assert (received.merge_modules, received.keep_base) == (["m"], ["m"])
    got = dict(received.tensors)
    parts = {k.removeprefix("m.weight."): v for k, v in got.items() if k.startswith("m.weight.")}
    rebuilt = merge_math.unpack_quant_state(parts, device="cpu")
    assert rebuilt is not None and rebuilt.nested and rebuilt.blocksize == 64
    before = merge_math.base_float32(codes, state)
    after = merge_math.base_float32(got["m.weight"], rebuilt)
    assert torch.equal(before.view(torch.int32), after.view(torch.int32))
    assert merge_math.unpack_quant_state({}, device="cpu") is None  # a dense base layer has no state
