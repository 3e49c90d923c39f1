"""Small helpers shared by the kernel launchers: when Triton can run, block sizes, warps."""
from __future__ import annotations

import functools
import os

import torch

try:  # Triton is Linux-only; everything here falls back to the torch references without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - a missing or broken Triton means "use the references"
    triton = None
    tl = None
    HAS_TRITON = False


# Read once: @triton.jit builds interpreter or compiled functions at import time, by this same variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` at import), as in the CPU tests."""
    return INTERPRET


def triton_ok(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path can run on these tensors: CUDA tensors, or CPU ones under the interpreter.

    The interpreter cannot do bf16, so bf16 CPU tensors go to the torch reference instead.
    """
    if not HAS_TRITON:
        return False
    ts = [t for t in tensors if t is not None]
    if all(t.is_cuda for t in ts):
        return True
    if interpreting() and all(t.device.type == "cpu" for t in ts):
        return all(t.dtype != torch.bfloat16 for t in ts)
    return False


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Ceil division for launch grids. Plain Python on purpose: ``triton.cdiv`` is a ``constexpr_function``
    since Triton 3.5 and costs microseconds per host call, which shows in sub-millisecond ops."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int = 0) -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 4


def programs_for(t: torch.Tensor) -> int:
    """How many persistent programs to launch for a reduction over rows (one or two per SM on a GPU)."""
    if t.is_cuda:
        return 2 * sm_count(t.device.index or 0)
    return 4  # interpreter: few programs keep the sequential CPU emulation fast


def row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel with ``block`` elements (Liger / Unsloth use the same steps)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (N, H) with a unit stride on the last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2
