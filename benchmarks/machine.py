"""What every `qkv-bench` command shares: the machine it ran on, and its one-line refusal."""

import os
import platform
import sys
from pathlib import Path

EXIT_INVALID = 2


def fail(message: str) -> int:
    print(f"qkv-bench: error: {message}", file=sys.stderr)
    return EXIT_INVALID


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(
            next(
                x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
            ).split()[1]
        )
    except (OSError, StopIteration):
        mem = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem / 2**20, "platform": platform.platform()}
