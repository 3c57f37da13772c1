"""Print which float kernels this process gets: a hash of fixed float32 results, and torch's CPU capability.

    python scripts/kernel_fingerprint.py

Two runs under different kernel settings print different hashes where those settings really change
the last bits of float32 results, as another CPU would. What changes what depends on the CPU: on an
AVX-512 Intel Xeon ``MKL_ENABLE_INSTRUCTIONS=AVX2`` changes MKL's GEMM; on this project's AMD EPYC
(AVX-512 too) it does not, as MKL already runs a non-Intel path there, and ``MKL_CBWR=COMPATIBLE``
(MKL's SSE2 path, no FMA) does, on either. ``ATEN_CPU_CAPABILITY=avx2`` or ``=default`` changes ATen's
own kernels (softmax, exp, ...), ``ONEDNN_MAX_CPU_ISA=SSE41`` vLLM's oneDNN GEMM (``AVX2`` did not: oneDNN's AVX2
and AVX-512 kernels sum each output in the same order). CI prints this before each test pass so a
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
    out = {
        "gemm": _digest(a @ b),  # torch's float32 GEMM is MKL's sgemm: MKL_CBWR, MKL_ENABLE_INSTRUCTIONS
        "softmax": _digest(torch.softmax(c, dim=-1)),  # an ATen vectorised kernel: ATEN_CPU_CAPABILITY
        "capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:  # vLLM's CPU linear layers run oneDNN's GEMM: ONEDNN_MAX_CPU_ISA
        from vllm import _custom_ops as ops

        handler = ops.create_onednn_mm(b, 32)  # weight given as [K, N]
        out["vllm_onednn"] = _digest(ops.onednn_mm(handler, a, None))
    except Exception:  # no vLLM CPU build here (a GPU install): nothing to fingerprint
        out["vllm_onednn"] = "-"
    return out


SETTINGS = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def main() -> None:
    settings = {k: os.environ.get(k, "-") for k in SETTINGS}
    print("kernel fingerprint:", " ".join(f"{k}={v}" for k, v in {**settings, **fingerprint()}.items()))


if __name__ == "__main__":
    main()
