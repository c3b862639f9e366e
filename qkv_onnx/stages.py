"""Named pipeline stages: export and validation announce each stage with `with stage(NAME):`, and a listener
(the benchmarks' stage clock) can time them. Without a listener a stage costs one list check."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[str, str], None]  # (event 'enter' or 'exit', stage name)
_listeners: list[Listener] = []


@contextmanager
def stage(name: str) -> Iterator[None]:
    if not _listeners:
        yield
        return
    for listener in _listeners:
        listener("enter", name)
    try:
        yield
    finally:
        for listener in reversed(_listeners):
            listener("exit", name)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every stage's enter and exit to `listener` while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def progress(prog: str, stream) -> Listener:
    """A listener that prints on `stream` each stage the first time it starts, and any run of it that took a
    second or more: a multi-minute export or validation says what it is doing."""
    import time

    started: dict[str, float] = {}
    origin = time.monotonic()

    def say(text: str) -> None:
        print(f"{prog}: [{time.monotonic() - origin:6.1f} s] {text}", file=stream, flush=True)

    def listener(event: str, name: str) -> None:
        now = time.monotonic()
        if event == "enter":
            if name not in started:
                say(name)
            started[name] = now
        elif now - started.get(name, now) >= 1.0:
            say(f"{name}: took {now - started[name]:.1f} s")

    return listener


PROGRESS_HELP = (
    "print each stage on stderr as it starts, and its time when it took a second or more (default: when "
    "stderr is a terminal)"
)


def add_progress_flag(parser) -> None:
    """--progress / --no-progress on a CLI's parser."""
    import argparse

    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=PROGRESS_HELP)


@contextmanager
def reporting_progress(prog: str, wanted: bool | None) -> Iterator[None]:
    """progress() on stderr while the block runs, if `wanted` (None: if stderr is a terminal)."""
    import sys

    if not (wanted or (wanted is None and sys.stderr.isatty())):
        yield
        return
    with listening(progress(prog, sys.stderr)):
        yield
