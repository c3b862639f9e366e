"""The thread pools' manners in qkv-onnx's processes, set in the environment before the libraries load.

Validation runs about four processes at once (the oracle and PyTorch, a child per runtime, the rebuild)
and export draws the weights on one thread while it traces on another. Idle pool threads that spin-wait
take a core from that other work: OpenBLAS's spun for a third of qkv-validate's CPU on 2 cores, torch's
OpenMP pool slowed export's tracing (docs/timing.md). The CLIs and the sandbox's children set these
where the user has not."""

import os

BLAS_THREADS = str(max(1, (os.cpu_count() or 1) // 4))
POLICY = {"OPENBLAS_NUM_THREADS": BLAS_THREADS, "OMP_WAIT_POLICY": "PASSIVE"}
