"""The physical ceilings of a CUDA machine, as JSON on stdout: what `offspec bench` figures are compared with.

usage: python scripts/rawbw.py [SCRATCH_FILE] [--disk-gib N] [--no-layer]
- host->device copy bandwidth from pinned and from pageable memory (GB/s);
- cold disk reads (GB/s, three runs: write SCRATCH_FILE, then evict and preadv it; put it on the disk the
  stores live on);
- one Qwen2.5-7B-shaped bf16 decoder layer's seven matmuls against rows (ms for 1..4096 rows): the compute
  side of a tree pass.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def h2d_gbps(pinned: bool, nbytes: int = 1 << 30, reps: int = 8) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()
    return nbytes * reps / (time.perf_counter() - t) / 1e9


def disk_cold_gbps(path: str, nbytes: int = 4 << 30, chunk: int = 256 << 20, runs: int = 3) -> list[float]:
    """Write `nbytes` of incompressible data, then `runs` times: evict from the page cache, preadv it all."""
    buf = bytearray(chunk)
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // chunk)):
            f.write(os.urandom(1 << 20) * (chunk >> 20))
        f.flush()
        os.fsync(f.fileno())
    out = []
    try:
        for _ in range(runs):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t = time.perf_counter()
                n = 0
                while True:
                    r = os.preadv(fd, [buf], n)
                    if r <= 0:
                        break
                    n += r
                out.append(n / (time.perf_counter() - t) / 1e9)
            finally:
                os.close(fd)
    finally:
        os.remove(path)
    return out


def layer_ms_by_rows(hidden: int = 3584, inter: int = 18944, kv: int = 512) -> dict[int, float]:
    """One Qwen2.5-7B-shaped layer's linears in bf16, milliseconds against rows (tokens in the pass)."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]
    ws = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) for o, i in shapes]
    res = {}
    for rows in (1, 16, 64, 256, 1024, 4096):
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        xi = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            for w in ws:
                torch.nn.functional.linear(xi if w.shape[1] == inter else x, w)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            for w in ws:
                torch.nn.functional.linear(xi if w.shape[1] == inter else x, w)
        torch.cuda.synchronize()
        res[rows] = round((time.perf_counter() - t) / 20 * 1e3, 4)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scratch", nargs="?", default="/tmp/offspec-rawbw.bin")
    ap.add_argument("--disk-gib", type=float, default=4.0)
    ap.add_argument("--no-layer", action="store_true", help="skip the matmul timing")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("rawbw.py measures a CUDA machine: CUDA is not available here")
    r = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
         "h2d_pinned_GBps": round(h2d_gbps(True), 2), "h2d_pageable_GBps": round(h2d_gbps(False), 2)}
    if not a.no_layer:
        r["layer_ms_by_rows"] = layer_ms_by_rows()
    r["disk_cold_GBps"] = [round(x, 2) for x in disk_cold_gbps(a.scratch, int(a.disk_gib * (1 << 30)))]
    print(json.dumps(r))


if __name__ == "__main__":
    main()
