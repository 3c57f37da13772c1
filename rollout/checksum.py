"""One checksum for weights, computed the same way on the learner and on every rollout worker."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


def weights_checksum(named_tensors: Iterable[tuple[str, Any]]) -> str:
    """blake2b over names, dtypes, shapes and raw bytes, in order: equal iff the payloads are equal."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named_tensors:
        flat = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{flat.dtype}|{tuple(flat.shape)}".encode())
        digest.update(flat.reshape(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8
