"""What every runtime adapter provides (see validate/runtimes/__init__.py)."""

from pathlib import Path

from ...errors import ProviderError

__all__ = ["ProviderError", "Runtime"]


class Runtime:
    """One way to execute an artifact. An adapter sets the class attributes, opens the model in
    __init__ (raising ProviderError with the runtime's reason) and returns numpy outputs from run().

    gating: its parity checks decide pass/fail. A non-gating runtime (a deployment default that
    computes in a lower precision than the artifact's, on purpose) is judged at the tolerance of
    `compute_dtype` and reported beside the others; its run errors and non-finite outputs still fail.
    """

    name = ""
    label = ""  # in notes and errors
    short = ""  # in table columns
    gating = True

    def __init__(self, model_path: Path):
        self.providers = [self.label]  # what the session really runs on, for the report
        self.notes = []  # per-session findings worth a line in the report
        self.compute_dtype = None  # set when it computes in another precision than the artifact's dtype

    @classmethod
    def problem(cls) -> str | None:
        """Why this runtime cannot run on this machine at all (not installed, no device), or None."""
        return None

    @classmethod
    def redundant(cls) -> str | None:
        """Why `--providers auto` leaves it out on this machine although it runs (it would compute what
        another selected runtime computes), or None. Asked for by name, it runs."""
        return None

    @classmethod
    def gap(cls, artifact) -> str | None:
        """Why this runtime is known not to run this artifact (a dtype or op domain it lacks), or None."""
        return None

    def run(self, inputs: list) -> list:
        raise NotImplementedError
