"""Scratch directories that do not outlive their process: a watchdog child waits on a pipe only the parent
holds and removes the directory once the pipe closes, which it does however the parent ends (SIGKILL and the
kernel's OOM killer included). A killed validation leaves no multi-GB private copy behind."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# -S: no site import, so the watchdog starts in milliseconds and holds a few MB
_WATCH = "import shutil, sys; sys.stdin.buffer.read(); shutil.rmtree(sys.argv[1], ignore_errors=True)"


class Watchdog:
    """Removes `path` when this process ends; `release()` when the directory has been removed or published."""

    def __init__(self, path: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-c", _WATCH, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not killed with the parent's process group: it has work left then
        )

    def release(self) -> None:
        if self.process is not None:
            self.process.stdin.close()  # its rmtree finds nothing left
            self.process.wait()
            self.process = None


class ScratchDir:
    """A private temporary directory (0o700): cleanup() removes it, its watchdog does if the process dies."""

    def __init__(self, prefix: str):
        self.name = tempfile.mkdtemp(prefix=prefix)
        self._watchdog = Watchdog(Path(self.name))

    def cleanup(self) -> None:
        shutil.rmtree(self.name, ignore_errors=True)
        self._watchdog.release()
