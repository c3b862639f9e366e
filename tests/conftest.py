"""Shared fixtures: artifacts exported once per test session with the real exporter.

A test that uses them (or is marked `slow` itself) exports or runs real models: it is marked `slow`
here, so `pytest -m "not slow"` is the fast inner loop.
"""

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXPORTING_FIXTURES = {
    *("exported", "artifact_copy", "exported_external", "exported_minilm", "faults_site"),
    "onnx_session",  # test_checkpoint.py: the real minilm-l6 export on ORT
}
FAULTS = Path(__file__).parent / "plugins" / "qkv-onnx-faults"


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory that every pytest-xdist worker of this run shares (without xdist, this process's own)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name
    path.mkdir(exist_ok=True)
    return path


def export_once(root: Path, name: str, model: str, **options) -> Path:
    """root/name: `model` exported there by the first worker that asks, under a lock the others wait on
    (export_artifact publishes atomically: the directory is whole or absent)."""
    from qkv_onnx.export.pipeline import export_artifact

    path = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_dir():
            export_artifact(model, path, **options)
    return path


def pytest_collection_modifyitems(items):
    for item in items:
        if EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("matrix"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def rebuild_cache(tmp_path_factory):
    """The session's rebuild cache (tests/helpers.py): each distinct rebuild runs once, in this process's
    validations and in the subprocesses of run_capped."""
    from helpers import REBUILD_CACHE, install_rebuild_cache

    import qkv_onnx.validate.artifact as artifact

    cache = shared_dir(tmp_path_factory, "rebuilds")
    real = artifact.PendingRebuild
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(REBUILD_CACHE, str(cache))
        install_rebuild_cache(cache)
        yield cache
        artifact.PendingRebuild = real


@pytest.fixture(autouse=True)
def real_rebuild(request, rebuild_cache, monkeypatch):
    """A test marked `real_rebuild` sees the exporter run in the rebuild's child every time."""
    if request.node.get_closest_marker("real_rebuild"):
        from helpers import REBUILD_CACHE

        from qkv_onnx.validate import rebuild

        monkeypatch.setattr("qkv_onnx.validate.artifact.PendingRebuild", rebuild.PendingRebuild)
        monkeypatch.delenv(REBUILD_CACHE)


@pytest.fixture(scope="session", autouse=True)
def no_step_summary():
    """Tests never append to the job summary of the CI run that executes them: qkv-validate writes there
    when GITHUB_STEP_SUMMARY is set (tests that check that set it themselves)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("GITHUB_STEP_SUMMARY", raising=False)
        yield


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """export(model, dtype='float32', backend='onnx-attention') -> path of a pristine artifact, exported
    once for all workers (copy before mutating)."""
    root, cache = shared_dir(tmp_path_factory, "artifacts"), {}

    def get(model: str, dtype: str = "float32", backend: str = "onnx-attention") -> Path:
        key = (model, dtype, backend)
        if key not in cache:
            name = f"{model}-{dtype}" if backend == "onnx-attention" else f"{model}-{backend}-{dtype}"
            cache[key] = export_once(root, name, model, backend=backend, dtype=dtype)
        return cache[key]

    return get


@pytest.fixture
def artifact_copy(exported, tmp_path):
    """copy(model, dtype='float32', backend='onnx-attention') -> a private copy of an exported artifact,
    safe to tamper with."""

    def copy(model: str, dtype: str = "float32", backend: str = "onnx-attention") -> Path:
        src = exported(model, dtype, backend)
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def exported_external(tmp_path_factory):
    """Path of a pristine 'mha' artifact exported with its weights in the model.onnx.data side file."""
    return export_once(shared_dir(tmp_path_factory, "artifacts"), "mha-external", "mha", external_data=True)


@pytest.fixture(scope="session")
def exported_minilm(tmp_path_factory):
    """A pristine all-MiniLM-L6-v2 artifact (real weights and tokenizer; skipped where not installed)."""
    from qkv_onnx.model_defs.checkpoint import CheckpointError, minilm_dir

    try:
        minilm_dir()
    except CheckpointError as e:
        pytest.skip(f"all-MiniLM-L6-v2 files not installed ({e})")
    return export_once(shared_dir(tmp_path_factory, "artifacts"), "minilm-l6", "minilm-l6")


@pytest.fixture(scope="session")
def faults_site(tmp_path_factory):
    """tests/plugins/qkv-onnx-faults (runtimes that compute one layer wrong), installed with its entry points
    into a private directory only: put it on PYTHONPATH to see them."""
    site = tmp_path_factory.mktemp("faults-site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*pip, str(site), str(FAULTS)], check=True, capture_output=True, timeout=300)
    return site
