"""The errors a user can hit, each with its exit code, and the wrapper every CLI runs in.

0  success
1  ExportError, ParityFailure: the tool ran and the result is a failure
2  UsageError, ArtifactError, ProviderError: a bad argument, artifact or runtime (one line on stderr)
3  anything else: a bug in qkv-onnx (the traceback is printed; please report it)
4  qkv-validate: nothing failed, but no gating runtime compared the graph's outputs (not judged)
"""

import atexit
import gc
import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERNAL, EXIT_NOT_JUDGED = 0, 1, 2, 3, 4


class QkvError(Exception):
    """An expected failure: its message is one line for stderr, `exit_code` what the CLI returns."""

    exit_code = EXIT_FAILED


class UsageError(QkvError):
    """A bad argument, or an input file that cannot be used (a checkpoint, a sentence file)."""

    exit_code = EXIT_INVALID


class ArtifactError(QkvError):
    """The artifact is unusable. The message names the file and the reason."""

    exit_code = EXIT_INVALID


class LimitExceeded(ArtifactError):
    """A step run in a sandbox (the checker, a runtime) went past its time or memory limit on the artifact."""


class ProviderError(QkvError):
    """The requested runtime cannot run here, or cannot run this artifact."""

    exit_code = EXIT_INVALID


class BrokenEnvironment(ProviderError):
    """Something installed here cannot even be imported (a broken torch build, a missing shared library): a
    fact about this machine, never about the artifact."""


class ExportError(QkvError):
    """The export failed: the exporter errored or the fusion check refused the graph."""

    exit_code = EXIT_FAILED


class ParityFailure(QkvError):
    """A parity check failed: out of tolerance, NaN/Inf, or a run that errored."""

    exit_code = EXIT_FAILED


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): error lines stay one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def show(name) -> str:
    """A file name (or any string an artifact supplies) as an error line quotes it: Python's repr, so a
    newline, quote or other control character in it stays escaped inside one line and cannot pass for
    more text."""
    return repr(str(name))


def one_line(text: str) -> str:
    """`text` made safe for one stderr line: newlines and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def report_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)


def run_cli(prog: str, body) -> int:
    """Run `body()` (returns an exit code): a QkvError becomes its one line and exit code; any other exception
    is our bug, printed with its traceback and exit code 3, never passed off as a problem with the input."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)  # teardown then skips torch's heap: 0.4 s after an export, not 2.1
    try:
        return body()
    except QkvError as e:
        report_error(prog, str(e).strip() or type(e).__name__)  # one line: report_error escapes newlines
        return e.exit_code
    except Exception:
        traceback.print_exc()
        print(
            f"{prog}: internal error: this is a bug in qkv-onnx, not a problem with your input; "
            "please report it "
            "with the traceback above (exit code 3)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
