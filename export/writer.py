"""Write an artifact directory: model.onnx, weights.npz, golden test_data_set_N/, manifest.json.

Everything is built in a sibling temporary directory and swapped into place at the end, so an
interrupted export leaves no half artifact and never touches an older one.
"""

import ctypes
import os
import platform
import shutil
import zipfile
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from ..artifact_format import FORMAT, MANIFEST, golden_file, sha256_bytes, sha256_file, signed

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_weights_npz(path: Path, arrays: dict) -> None:
    """An .npz readable by `np.load(allow_pickle=False)`, byte-identical for identical arrays
    (np.savez stamps the current time into the zip). Each array is written straight into its zip entry."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            array = np.ascontiguousarray(arrays[name])
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.file_size = array.nbytes  # whether the entry needs zip64: writestr's rule, on its size
            with zf.open(info, "w") as entry:
                np.lib.format.write_array(entry, array, allow_pickle=False)


def write_file(path: Path, data) -> dict:
    """Write `data` at `path`; its file-table entry (sha256, bytes), from the bytes in memory."""
    path.write_bytes(data)
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def save_test_data_set(directory: Path, n: int, input_names, inputs, output_names, outputs) -> None:
    """Golden set `n` in ONNX's standard layout: input_K.pb / output_K.pb TensorProtos named after the
    graph's inputs and outputs."""
    (directory / golden_file(n, "input", 0)).parent.mkdir()
    for kind, names, arrays in (("input", input_names, inputs), ("output", output_names, outputs)):
        for k, (name, array) in enumerate(zip(names, arrays, strict=True)):
            tensor = numpy_helper.from_array(np.asarray(array), name)
            (directory / golden_file(n, kind, k)).write_bytes(tensor.SerializeToString())


def file_table(directory: Path, known: dict | None = None) -> dict:
    """{relative path: {sha256, bytes}} of every file under `directory`; `known`: entries of files this
    export wrote from memory (not read again)."""
    known = known or {}
    table = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and p.name != MANIFEST:
            table[rel] = known.get(rel) or {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return table


def write_manifest(directory: Path, manifest: dict, known: dict | None = None) -> dict:
    """Add the format tag and the sha256 of every file, write manifest.json, return the whole manifest."""
    manifest = {**manifest, "format": FORMAT, "files": file_table(directory, known)}
    (directory / MANIFEST).write_text(signed(manifest))
    return manifest


def temporary_dir_for(target: Path) -> Path:
    """A fresh build directory beside `target`; stale ones from killed exports are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, target: Path) -> None:
    """Move the finished build to `target`, atomically replacing an existing artifact."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp)  # now holds the previous artifact
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths in one step. False where unsupported."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
