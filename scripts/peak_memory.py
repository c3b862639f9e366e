"""Peak memory of a command as the machine sees it: the fall of MemAvailable (/proc/meminfo) below its value
at the start, sampled every 50 ms, with the command's wall time and exit code. Every process the command
starts counts (sandboxed runtimes, the rebuild's exporter), and so does anything else running on the machine:
measure on a quiet one.

    python scripts/peak_memory.py -- qkv-validate artifacts/big --providers cpu
"""

import subprocess
import sys
import threading
import time


def available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    start, lowest, done = available_kib(), [available_kib()], threading.Event()

    def sample():
        while not done.wait(0.05):
            lowest[0] = min(lowest[0], available_kib())

    watcher = threading.Thread(target=sample, daemon=True)
    t0 = time.monotonic()
    watcher.start()
    code = subprocess.call(argv)
    done.set()
    watcher.join()
    seconds = time.monotonic() - t0
    peak = (start - lowest[0]) / 2**20
    print(
        f"peak {peak:.2f} GiB (MemAvailable {start / 2**20:.1f} GiB at start), {seconds:.0f} s, exit {code}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
