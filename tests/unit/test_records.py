"""A WeightUpdate crosses Ray as raw buffers and arrives bit-identical, whatever the dtype or shape."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from grpo_ray.checksum import weights_checksum
from grpo_ray.records import WeightUpdate


def test_weight_update_round_trip_is_exact_and_out_of_band() -> None:
    tensors = [
        ("layer.weight", torch.randn(3, 4)),
        ("layer.bias", torch.randn(5).to(torch.bfloat16)),  # numpy has no bfloat16: sent as bytes
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.zeros(0, 3)),
        ("strided", torch.randn(4, 6)[:, ::2]),  # not contiguous on the learner side
    ]
    update = WeightUpdate(7, "merged", tensors, weights_checksum(tensors))

    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(update, protocol=5, buffer_callback=buffers.append)
    received = pickle.loads(stream, buffers=buffers)

    # the weight bytes travel as out-of-band buffers (what Ray writes to its store without a copy)
    assert sum(memoryview(b).nbytes for b in buffers) == update.num_bytes
    assert len(stream) < 2000
    assert (received.version, received.mode, received.checksum) == (7, "merged", update.checksum)
    for (name, sent), (got_name, got) in zip(tensors, received.tensors, strict=True):
        assert got_name == name and got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got, sent)
    assert weights_checksum(received.tensors) == update.checksum


def test_received_tensors_do_not_alias_the_received_buffer() -> None:
    update = WeightUpdate(1, "merged", [("w", torch.ones(4))], "")
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(update, protocol=5, buffer_callback=buffers.append)
    received = pickle.loads(stream, buffers=buffers)
    received.tensors[0][1].add_(1.0)  # a loader writing into what it was given
    assert np.frombuffer(buffers[0].raw(), dtype=np.float32).tolist() == [1.0] * 4
