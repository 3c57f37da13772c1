"""One checksum for weights, computed the same way on the learner and on every rollout worker."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import xxhash


def weights_checksum(named_tensors: Iterable[tuple[str, Any]]) -> str:
    """xxh3-128 over names, dtypes, shapes and raw bytes, in order: equal iff the payloads are equal.

    It guards against a wrong or partial payload, not an adversary, so a fast non-cryptographic hash
    does: xxh3 hashes 90 MB in 3 ms where blake2b took 95 ms, on every sync, learner and workers alike.
    """
    digest = ChecksumStream()
    for name, tensor in named_tensors:
        digest.add(name, tensor)
    return digest.hexdigest()


class ChecksumStream:
    """`weights_checksum` one tensor at a time, for weights that are built, used and dropped one by one."""

    def __init__(self) -> None:
        self._digest = xxhash.xxh3_128()

    def add(self, name: str, tensor: Any) -> None:
        flat = tensor.detach().contiguous().cpu()
        self._digest.update(f"{name}|{flat.dtype}|{tuple(flat.shape)}".encode())
        self._digest.update(flat.reshape(-1).view(dtype=_byte_dtype()).numpy())  # the buffer itself, no copy

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8
