"""Run what touches an artifact's graph (onnx.checker, each runtime's session) in a child process under
a memory and a wall-clock limit.

The child is a fresh interpreter started with subprocess (the parent's threads, torch's OpenMP pool among
them, are never forked; and unlike multiprocessing's spawn, the parent's main script is never re-run in
it), talking over two pipes of its own (its stdin, stdout and stderr go nowhere: what native code prints,
a Rust panic's backtrace, cannot break the one line the parent reports). Its address space is capped
with RLIMIT_AS once numpy is imported, before the runtime is; the parent waits for each answer at most
`Limits.seconds` and kills the child past it. A limit hit is LimitExceeded (exit 2) naming the file and
the limit. Inputs and outputs cross the pipe pickled; the parent unpickles an answer with an allow-list
(numpy arrays, dtypes and scalars, bfloat16, plain containers and strings), so a child subverted through
a runtime's bug cannot hand it code to run.

`SandboxedRuntime(cls, model_path, limits)` hosts any `Runtime` adapter class importable by its module
and name (a built-in one or a plugin's) with the adapter's own interface; `open_runtime` (in
validate.runtimes) is what parity calls.
"""

import errno
import importlib
import io
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from ..errors import ArtifactError, BrokenEnvironment, LimitExceeded, ProviderError, QkvError, show
from ..threads import POLICY

GIB = 1 << 30
BASE_MEMORY = 2 * GIB  # an interpreter with numpy and a runtime, before the model (OpenVINO's is the largest)
MEMORY_PER_MODEL_BYTE = 4  # the model read, the runtime's own copy, prepacked weights, activations
THREAD_MEMORY = 64 << 20  # a thread's stack and malloc arena, per CPU
BASE_SECONDS = 120.0
SECONDS_PER_GIB = 240.0  # the slowest runtime here (onnx's reference evaluator) on bert-large: ~25 s a run
# The child's first words: take the parent's import path, then serve on the two descriptors it was given.
_BOOTSTRAP = (
    "import json, os, sys; sys.path[:] = json.loads(os.environ.pop('QKV_SANDBOX_PATH')); "
    "from qkv_onnx.validate.sandbox import _main; _main(*map(int, sys.argv[1:]))"
)


@dataclass(frozen=True)
class Limits:
    """What one sandboxed step may use: `memory` bytes of address space, `seconds` of wall-clock time (the
    open of a session, one run, the checker), each for the process or step."""

    memory: int
    seconds: float

    @classmethod
    def for_model(cls, model_bytes: int, memory: int | None = None, seconds: float | None = None) -> "Limits":
        """Defaults sized from the model file(s); `memory`/`seconds` override them (the CLI's flags)."""
        default_memory = (
            BASE_MEMORY + MEMORY_PER_MODEL_BYTE * model_bytes + THREAD_MEMORY * (os.cpu_count() or 1)
        )
        default_seconds = BASE_SECONDS + SECONDS_PER_GIB * model_bytes / GIB
        return cls(
            memory if memory is not None else default_memory,
            seconds if seconds is not None else default_seconds,
        )

    def describe(self) -> str:
        return f"{self.memory / GIB:.1f} GiB of memory and {self.seconds:.0f} s per step"


# --- the child ---------------------------------------------------------------------------------------

_served = {}  # the child's state: the runtime it hosts


def _limit_memory(memory: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    try:  # few malloc arenas: each thread's reserves 64 MB of address space that the cap would count
        import ctypes

        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _peak_memory() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _main(reader: int, writer: int, memory: int) -> None:
    """The child: serve calls from `reader`, answer on `writer`, under `memory` bytes of address space."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends us
    answers = Connection(writer, readable=False)
    import numpy  # noqa: F401  (before the cap: OpenBLAS exits the process when it cannot map its buffers)

    _limit_memory(memory)
    _serve(Connection(reader, writable=False), answers)


# What an ImportError says when the address-space cap, not the installation, stopped it (glibc's loader
# cannot map a shared library's segments).
CAPPED_IMPORT = ("failed to map segment", "cannot allocate memory", "out of memory")


def _kind(e: BaseException) -> str:
    """How the parent should read a failure: a memory limit (MemoryError; an ImportError of a library the
    cap kept from being mapped), a broken installation (any other ImportError: nothing about the
    artifact; nor is a full disk), a runtime's ProviderError, another QkvError about the artifact, or
    anything else."""
    if isinstance(e, MemoryError):
        return "memory"
    if isinstance(e, ImportError):
        return "memory" if any(w in str(e).lower() for w in CAPPED_IMPORT) else "environment"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk: the machine's
        return "environment"
    if isinstance(e, ProviderError):
        return "provider"
    return "artifact" if isinstance(e, QkvError) else "error"


def _serve(requests: Connection, answers: Connection) -> None:
    """The child's loop: call what the parent asks, answer ('ok', result) or ('error', ...)."""
    while True:
        try:
            module, name, args = requests.recv()
        except (EOFError, OSError):
            return
        except BaseException as e:  # unpickling the request under the cap
            answers.send(_error(e))
            continue
        try:
            answers.send(answer(_call, module, name, args))
        except BaseException as e:  # the answer cannot be sent (pickled): that is the answer
            try:
                answers.send(_error(e))
            except BaseException:
                return


def _call(module: str, name: str, args: tuple):
    return getattr(importlib.import_module(module), name)(*args)


def _error(e: BaseException) -> tuple:
    return ("error", _kind(e), type(e).__name__, str(e), _peak_memory())


def answer(function, *args) -> tuple:
    """What the child sends for `function(*args)`: ('ok', result), or ('error', kind, type, message, peak
    memory): everything goes back to the parent, which decides what it means (Sandbox.answered)."""
    try:
        return ("ok", function(*args))
    except BaseException as e:
        return _error(e)


def _open(module: str, qualname: str, model_path: str) -> dict:
    cls = getattr(importlib.import_module(module), qualname)
    runtime = _served["runtime"] = cls(Path(model_path))
    return {"providers": runtime.providers, "notes": runtime.notes, "compute_dtype": runtime.compute_dtype}


def _run(inputs: list) -> list:
    import numpy as np

    return [np.asarray(x) for x in _served["runtime"].run(inputs)]


def _check(path: str) -> None:
    import onnx

    onnx.checker.check_model(path, full_check=True)


def _tokenize(directory: str, sentences: list, max_length: int, pad_id: int) -> dict:
    from ..text import tokenize

    return tokenize(directory, sentences, max_length=max_length, pad_id=pad_id)


# --- the parent --------------------------------------------------------------------------------------

ANSWER_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("ml_dtypes", "bfloat16"),
}


class _AnswerUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ANSWER_GLOBALS:
            raise pickle.UnpicklingError(f"the sandboxed process answered with {module}.{name}")
        return super().find_class(module, name)


def _load_answer(data: bytes):
    return _AnswerUnpickler(io.BytesIO(data)).load()


MEMORY_WORDS = ("bad_alloc", "bad allocation", "allocate", "out of memory", "memoryerror")


class Sandbox:
    """One child process that answers calls of functions of this module, under `limits`. Errors name
    `shown` (the artifact's file, not the private copy the child reads)."""

    def __init__(self, limits: Limits, shown: Path, private: Path | None = None):
        self.limits, self.shown_path, self.private = limits, shown, private
        self.shown = show(shown)
        from_parent, to_child = os.pipe()
        from_child, to_parent = os.pipe()
        env = {**POLICY, **os.environ, "QKV_SANDBOX_PATH": json.dumps(sys.path)}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(from_parent), str(to_parent), str(limits.memory)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(from_parent, to_parent),
                env=env,
            )
        finally:
            os.close(from_parent)
            os.close(to_parent)
        self.requests = Connection(to_child, readable=False)
        self.conn = Connection(from_child, writable=False)
        self.pending = None

    def submit(self, what: str, function, *args) -> None:
        """Start `function(*args)` in the child (a module-level function, or the name of one of this
        module's); `result()` waits for it. `what` names the step in messages."""
        target = (
            (__name__, function)
            if isinstance(function, str)
            else (function.__module__, function.__qualname__)
        )
        self.pending = what
        try:
            self.requests.send((*target, args))
        except (BrokenPipeError, OSError):
            pass  # the child is gone: result() says why

    def result(self):
        what, self.pending = self.pending, None
        if not self.conn.poll(self.limits.seconds):
            self.close()
            raise LimitExceeded(
                f"{self.shown}: {what} ran past the time limit of {self.limits.seconds:g} s (--time-limit)"
            )
        try:
            reply = _load_answer(self.conn.recv_bytes())
        except pickle.UnpicklingError as e:
            self.close()
            raise ArtifactError(f"{self.shown}: {what}: {e}") from None
        except (EOFError, OSError):
            try:
                code = self.process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            if code is not None and code < 0 and -code in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT):
                # a runtime that cannot allocate under RLIMIT_AS often aborts (std::bad_alloc uncaught)
                raise LimitExceeded(
                    f"{self.shown}: {what} was killed by signal {-code} under the memory limit of "
                    f"{self.limits.memory / GIB:.3g} GiB (--memory-limit)"
                ) from None
            raise ArtifactError(
                f"{self.shown}: {what} ended the sandboxed process (exit code {code})"
            ) from None
        return self.answered(what, reply)

    def answered(self, what: str, answer: tuple):
        """The result an answer carries, or the error it reports, as this sandbox's caller sees it."""
        if answer[0] == "ok":
            return answer[1]
        _, kind, type_name, message, peak = answer
        if self.private is not None:  # the child read the private copy: name the artifact's file instead
            message = message.replace(str(self.private), str(self.shown_path))
        if kind == "environment":
            self.close()
            raise BrokenEnvironment(f"{what}: {type_name}: {message}")
        near = peak >= 0.9 * self.limits.memory
        if kind == "memory" or near or any(w in message.lower() for w in MEMORY_WORDS):
            self.close()
            raise LimitExceeded(
                f"{self.shown}: {what} ran past the memory limit of {self.limits.memory / GIB:.3g} GiB "
                "(--memory-limit)"
            )
        if kind == "provider":
            raise ProviderError(message)
        if kind == "artifact":
            raise ArtifactError(message)
        raise SandboxedError(f"{type_name}: {message}" if message else type_name)

    def call(self, what: str, function, *args):
        self.submit(what, function, *args)
        return self.result()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for conn in (self.requests, self.conn):
            if not conn.closed:
                conn.close()


class SandboxedError(Exception):
    """An exception raised in the child (its type and message): what the hosted code raised."""


class SandboxedRuntime:
    """A `Runtime` adapter class hosted in a sandbox, with the adapter's interface: class attributes
    (name, label, short, gating, problem(), gap()), providers, notes and compute_dtype as the child's
    instance set them, and run(inputs) -> outputs. `submit`/`result` split a run so that several
    runtimes compute at once."""

    def __init__(self, cls, model_path, limits: Limits, shown=None, plugin: bool = False):
        self.cls, self.plugin = cls, plugin
        self.name, self.label, self.short, self.gating = cls.name, cls.label, cls.short, cls.gating
        self.problem, self.gap = cls.problem, cls.gap
        self.model_path = Path(model_path)
        self.sandbox = Sandbox(limits, Path(shown if shown is not None else model_path), self.model_path)
        self.sandbox.submit(
            f"{cls.label}: opening the model", "_open", cls.__module__, cls.__qualname__, str(model_path)
        )
        self._opened = False

    def wait_open(self) -> "SandboxedRuntime":
        """Wait for the child to open the model; raise what the adapter raised (ProviderError) or a limit."""
        if not self._opened:
            try:
                state = self.sandbox.result()
            except SandboxedError as e:
                self.sandbox.close()
                if not self.plugin:
                    raise
                raise ProviderError(
                    f"{self.sandbox.shown}: runtime plugin {self.name!r} failed to open it: {e}"
                ) from None
            except BaseException:
                self.sandbox.close()
                raise
            self.providers, self.notes, self.compute_dtype = (
                state["providers"],
                state["notes"],
                state["compute_dtype"],
            )
            self._opened = True
        return self

    def submit(self, inputs: list) -> None:
        self.wait_open()
        self.sandbox.submit(f"{self.label}: a run", "_run", list(inputs))

    def result(self) -> list:
        return self.sandbox.result()

    def run(self, inputs: list) -> list:
        self.submit(inputs)
        return self.result()

    def close(self) -> None:
        self.sandbox.close()


def tokenize_sandboxed(
    directory: Path, shown: Path, sentences: list, max_length: int, limits: Limits, pad_id: int = 0
) -> dict:
    """`qkv_onnx.text.tokenize` of an artifact's tokenizer files (`directory`, errors naming `shown`) in a
    sandbox: the tokenizers library runs the files' regexes and can panic, hang or allocate on them."""
    sandbox = Sandbox(limits, shown, directory)
    try:
        return sandbox.call(
            "tokenizing the sentences", "_tokenize", str(directory), list(sentences), max_length, pad_id
        )
    except SandboxedError as e:
        raise ArtifactError(f"{show(shown)}: the tokenizer fails ({e})") from None
    finally:
        sandbox.close()


def check_model_sandboxed(path: Path, shown: Path, limits: Limits) -> None:
    """onnx.checker's full check of `path` in a sandbox; ArtifactError naming `shown` when it fails."""
    sandbox = Sandbox(limits, shown, path)
    try:
        sandbox.call("onnx.checker (full check)", "_check", str(path))
    except SandboxedError as e:
        raise ArtifactError(f"{show(shown)}: onnx.checker failed: {str(e).splitlines()[0]}") from None
    finally:
        sandbox.close()
