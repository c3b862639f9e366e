"""Interleaved timing: warm-up, then rounds that run every contender once in rotated order; medians and
spread."""

import os
import sys
import time

import numpy as np


class Progress:
    """A one-line text bar on stderr (silent when `enabled` is False)."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.done, self.enabled, self.width = max(total, 1), 0, enabled, width
        self.start = time.perf_counter()

    def step(self, label: str = "", n: int = 1):
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{elapsed:5.0f}s {label[:40]:<40}"
        )
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def interleaved(
    contenders: dict, warmup: int, rounds: int, progress: Progress | None = None, settle: float = 0.0
) -> dict:
    """{name: [seconds, ...]} for `contenders` ({name: zero-argument callable}). Each contender first runs
    `warmup` times; then in round r the contenders run once each, starting at position r (rotation), so no
    contender always follows the same neighbour. `settle` seconds of sleep (untimed) before each timed run
    let the previous contender's thread pool stop spinning (PyTorch's OpenMP threads spin for milliseconds
    after each op: an ORT GEMM right after a torch matmul ran at 121 GFLOP/s instead of 196 here)."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
        if progress:
            progress.step(f"warm-up {name}", 0)
    times = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if settle:
                time.sleep(settle)
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
        if progress:
            progress.step(f"round {r + 1}/{rounds}")
    return times


def summarize(samples: list) -> dict:
    """Median, interquartile range, p10/p90, min (milliseconds) of one contender's samples (seconds)."""
    a = np.asarray(samples) * 1e3
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {
        "median_ms": float(p50),
        "p25_ms": float(p25),
        "p75_ms": float(p75),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "min_ms": float(a.min()),
        "n": int(a.size),
    }


class MachineLoad:
    """CPU time other processes took while the run went on, from /proc/stat: `nice` (niced processes) and
    `other` (everything not this process or its children), each as a share of all cores' time."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return {
            "busy": user + nice + system + irq + softirq + steal,
            "nice": nice,
            "all": sum(fields[:8]),
            "own": own,
            "hz": os.sysconf("SC_CLK_TCK"),
        }

    def shares(self) -> dict:
        end = self._sample()
        if not self.start or not end:
            return {}
        d = {k: end[k] - self.start[k] for k in ("busy", "nice", "all", "own")}
        total = d["all"] or 1
        other = max(d["busy"] - d["own"] * end["hz"], 0)
        return {"nice": d["nice"] / total, "other": other / total}
