"""Print which float kernels this process gets: a hash of fixed float32 results, and torch's CPU capability.

    python scripts/kernel_fingerprint.py

Two runs under different kernel settings (e.g. ``MKL_ENABLE_INSTRUCTIONS=AVX2``,
``ATEN_CPU_CAPABILITY=default``) print different ``gemm`` hashes when those settings really change
the last bits of float32 results, as another CPU would: CI prints this before each test pass so a
second pass under forced kernels is visibly not a no-op. The inputs are integers over a power of two
(exact in float32, and made without any vectorised float op, unlike ``randn``), so a different hash
comes from the kernels' summation order and FMA use alone.
"""

from __future__ import annotations

import hashlib
import os

import torch

SHAPES = ((96, 384), (384, 128), (96, 128))  # the GEMM's a [M, K], b [K, N]; the softmax input


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def fingerprint() -> dict[str, str]:
    torch.set_num_threads(1)  # the thread count changes reduction splits; pin it so only kernels differ
    g = torch.Generator().manual_seed(0)
    # 21-bit integers / 2**20: exact inputs whose products need 42 bits, so every sum rounds.
    a, b, c = (torch.randint(-(2**20), 2**20, shape, generator=g).float() / 2**20 for shape in SHAPES)
    return {
        "gemm": _digest(a @ b),  # MKL sgemm: kernel choice follows MKL_ENABLE_INSTRUCTIONS
        "softmax": _digest(torch.softmax(c, dim=-1)),  # ATen vectorised kernel: ATEN_CPU_CAPABILITY
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def main() -> None:
    settings = {k: os.environ.get(k, "-") for k in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")}
    print("kernel fingerprint:", " ".join(f"{k}={v}" for k, v in {**settings, **fingerprint()}.items()))


if __name__ == "__main__":
    main()
