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
