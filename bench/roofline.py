"""Memory-copy roofline for memory-bound kernels, measured in the same run as the kernel it judges.

A kernel that streams B bytes is judged against what a plain copy reaches on the same device at the
same moment (shared machines drift, so a figure from another run means little): copy a buffer of
the same B bytes and count the bytes it moves, read + write (2B, as STREAM's "copy" does). A
kernel's fraction of the roofline is then (bytes it reads / its time) / that copy rate.

    from roofline import copy_roofline, timed
    roof = copy_roofline(nbytes, device)
    t = min(timed(fn, device, rounds=5))
    frac = nbytes / t / 1e9 / roof.gbps
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


def sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device="cpu", rounds: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `rounds` calls of fn (after `warmup` calls), synchronising the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


@dataclass(frozen=True)
class Roofline:
    nbytes: int      # bytes of the copied buffer
    seconds: float   # best copy time
    gbps: float      # (read + write) bytes / second / 1e9

    def fraction(self, bytes_read: int, seconds: float) -> float:
        """Fraction of the copy roofline reached by a kernel reading `bytes_read` in `seconds`."""
        return bytes_read / seconds / 1e9 / self.gbps


def copy_roofline(nbytes: int, device="cpu", rounds: int = 5) -> Roofline:
    """Best-of-`rounds` time of dst.copy_(src) for fp32 buffers of `nbytes` bytes."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)  # first copy (the warm-up) faults its pages in
    t = min(timed(lambda: dst.copy_(src), device, rounds=rounds, warmup=1))
    return Roofline(nbytes=4 * n, seconds=t, gbps=2 * 4 * n / t / 1e9)
