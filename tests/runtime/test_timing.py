"""The one clock: on CUDA it waits for each device's queued work before reading the host clock; on CPU it only reads it."""

from __future__ import annotations

import torch

from offspec.runtime import timing


def _log_clock(monkeypatch, cuda: bool) -> list:
    log: list = []
    ticks = iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: log.append("clock") or float(next(ticks)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: log.append(("sync", str(d))))
    return log


def test_cpu_reads_the_clock_without_synchronising(monkeypatch):
    log = _log_clock(monkeypatch, cuda=True)
    timing.clock(torch.device("cpu"), None, "cpu")
    assert log == ["clock"]


def test_cuda_devices_are_drained_once_each_before_the_clock_is_read(monkeypatch):
    log = _log_clock(monkeypatch, cuda=True)
    timing.clock(torch.device("cuda", 0), "cuda:0", torch.device("cpu"), torch.device("cuda", 1))
    assert log == [("sync", "cuda:0"), ("sync", "cuda:1"), "clock"]


def test_stopwatch_synchronises_at_both_boundaries(monkeypatch):
    log = _log_clock(monkeypatch, cuda=True)
    with timing.Stopwatch(torch.device("cuda", 0)) as sw:
        log.append("work")
    assert log == [("sync", "cuda:0"), "clock", "work", ("sync", "cuda:0"), "clock"]
    assert sw.s == 1.0  # two reads of the fake clock: 0 then 1


def test_without_cuda_a_cuda_device_is_not_synchronised(monkeypatch):
    log = _log_clock(monkeypatch, cuda=False)
    timing.clock("cuda")
    assert log == ["clock"]
