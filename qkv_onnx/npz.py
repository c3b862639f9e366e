"""weights.npz, read strictly: a zip of stored (uncompressed) `.npy` members, exactly the tensors the
config implies, each member's sizes and `.npy` header checked before its data is touched.

Nothing is decompressed (a member that expands is refused, not inflated), nothing is unpickled (an
object dtype is not the expected dtype), no member is read twice or left unchecked, no two members'
bytes overlap. The arrays are read-only memory maps of the members' bytes in the private copy (a file
only this process writes): a model's weights are the page cache's to hold, not copied into the heap.
"""

import io
import math
import struct
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import ArtifactError, first_line, show

NPY_HEADER_MAX = 10000  # numpy's own default cap on a .npy header
CENTRAL_ENTRY_MAX = 46 + 1024  # one central directory entry: fixed part, name and extra fields


def _directory_size(path: Path) -> tuple[int, int]:
    """(entries, bytes) of the zip's central directory from its end records, read before zipfile parses
    a single entry: a directory of millions of entries is refused without being built in memory. The
    archive must end with its end record (no comment), as an export writes it."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 22:
            raise ValueError("too short for a zip")
        f.seek(size - 22)
        sig, _, _, _, entries, cd_size, _, comment = struct.unpack("<4s4H2LH", f.read(22))
        if sig != b"PK\x05\x06" or comment:
            raise ValueError("no zip end record at the end of the file")
        if entries == 0xFFFF or cd_size == 0xFFFFFFFF:  # zip64: the real counts are in the zip64 record
            f.seek(size - 22 - 20)
            sig, _, offset, _ = struct.unpack("<4sLQL", f.read(20))
            if sig != b"PK\x06\x07" or offset > size - 56:
                raise ValueError("no zip64 end record")
            f.seek(offset)
            record = f.read(56)
            if record[:4] != b"PK\x06\x06":
                raise ValueError("no zip64 end record")
            entries, cd_size = struct.unpack("<QQ", record[32:48])
        return entries, cd_size


def _member_array(
    path: Path, start: int, size: int, name: str, shape: tuple, dtype: np.dtype, where: str
) -> np.ndarray:
    """The member whose `size` bytes begin at `start` of `path`, its .npy header checked, memory-mapped."""
    with open(path, "rb") as f:
        f.seek(start)
        fp = io.BytesIO(f.read(min(size, NPY_HEADER_MAX + 16)))
    try:
        version = np.lib.format.read_magic(fp)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in read_header:
            raise ValueError(f".npy version {version}")
        got_shape, fortran, got_dtype = read_header[version](fp, max_header_size=NPY_HEADER_MAX)
    except Exception as e:  # numpy raises ValueError, and others on a mangled header
        raise ArtifactError(f"{where}: member {name!r} is not a .npy array ({first_line(e)})") from None
    if got_dtype != dtype or tuple(got_shape) != shape or fortran:
        raise ArtifactError(
            f"{where}: {name} is {got_dtype.name if got_dtype.kind != 'O' else 'object'}"
            f"{list(got_shape)}{' (Fortran order)' if fortran else ''}, the config implies "
            f"{dtype.name}{list(shape)}"
        )
    offset = fp.tell()
    if size != offset + math.prod(shape) * dtype.itemsize:
        raise ArtifactError(f"{where}: member {name!r} has {size - offset} bytes of data for {list(shape)}")
    if not math.prod(shape):
        return np.empty(shape, dtype)
    return np.memmap(path, dtype, "r", start + offset, shape)


def _data_start(f, info: zipfile.ZipInfo, end: int) -> int:
    """Where `info`'s bytes begin: after its local header, whose name must be the directory's."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise _Unreadable(f"no local header for {info.filename!r}")
    n, extra = struct.unpack("<HH", header[26:30])
    if f.read(n) != info.orig_filename.encode():
        raise _Unreadable(f"the local header of {info.filename!r} names another member")
    start = info.header_offset + 30 + n + extra
    if start + info.file_size > end:
        raise _Unreadable(f"{info.filename!r} runs past the end of the archive")
    return start


class _Unreadable(Exception):
    """What the zip layer (zipfile, the end records) raised: the archive itself is mangled."""


def _zip(call, *args):
    """`call(*args)` of the zip layer; its failures on a mangled archive (BadZipFile, struct.error, an
    EOFError, a ValueError...) become _Unreadable, while our own code around it stays outside."""
    try:
        return call(*args)
    except Exception as e:
        raise _Unreadable(first_line(e)) from None


def read_weights(
    path: Path, shown: Path, expected: dict[str, tuple], dtype: np.dtype
) -> dict[str, np.ndarray]:
    """{name: array} of `expected` (name -> shape), all of `dtype`, from the .npz at `path` (errors name
    `shown`)."""
    where = show(shown)
    try:
        return _read(path, where, expected, dtype)
    except _Unreadable as e:
        raise ArtifactError(f"{where}: unreadable weights ({e})") from None


def _read(path: Path, where: str, expected: dict[str, tuple], dtype: np.dtype) -> dict[str, np.ndarray]:
    entries, cd_size = _zip(_directory_size, path)
    if entries != len(expected) or cd_size > len(expected) * CENTRAL_ENTRY_MAX:
        raise ArtifactError(
            f"{where}: {entries} members in a {cd_size}-byte zip directory; the config implies "
            f"{len(expected)} tensors"
        )
    zf = _zip(zipfile.ZipFile, path)
    with zf:
        infos = _zip(zf.infolist)
        names = [i.filename for i in infos]
        twice = sorted(n for n, count in Counter(names).items() if count > 1)
        if twice:
            raise ArtifactError(f"{where}: member {twice[0]!r} appears twice")
        wanted = {k + ".npy" for k in expected}
        missing, extra = sorted(wanted - set(names)), sorted(set(names) - wanted)
        if missing or extra:
            what = (
                f"holds {extra[0]!r}, which the config does not imply"
                if extra
                else f"lacks {missing[0]!r}, which the config implies"
            )
            raise ArtifactError(f"{where}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise ArtifactError(
                    f"{where}: member {info.filename!r} is compressed; an export stores members uncompressed"
                )
            if info.flag_bits & 0x1:
                raise ArtifactError(f"{where}: member {info.filename!r} is encrypted")
            name = info.filename[: -len(".npy")]
            need = math.prod(expected[name]) * dtype.itemsize
            if not need <= info.file_size <= need + NPY_HEADER_MAX:
                raise ArtifactError(
                    f"{where}: member {info.filename!r} is {info.file_size} bytes; "
                    f"{dtype.name}{list(expected[name])} takes {need}"
                )
        with open(path, "rb") as f:
            end = f.seek(0, 2)
            spans = sorted(((_data_start(f, i, end), i) for i in infos), key=lambda span: span[0])
        arrays, free_from = {}, 0
        for start, info in spans:
            if info.header_offset < free_from:
                raise ArtifactError(f"{where}: member {info.filename!r} overlaps the one before it")
            free_from = start + info.file_size
            name = info.filename[: -len(".npy")]
            arrays[name] = _member_array(path, start, info.file_size, name, expected[name], dtype, where)
    return {k: arrays[k] for k in expected}
