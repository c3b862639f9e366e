"""Read an artifact's files once.

The directory is walked without following links; each listed file is opened without following links
(every path component), read once, hashed, and compared with the manifest, and every later step reads it
from a private directory (0700, made by `tempfile`) whatever happens to the artifact directory meanwhile:

- a small file (or any file where the next way is not possible) is copied there while it is hashed;
- a large one is hard-linked there (no second copy on disk) under a read lease (fcntl F_SETLEASE) taken on
  the opened file before the link is made and the bytes are hashed. The kernel grants the lease only while
  nobody holds the file open for writing (a writable memory map included), and breaks it when anybody
  opens it for writing or truncates it; `Intake.check_unchanged()` then voids the verdict. Replacing the
  artifact's path (a rename over it) leaves the link on the bytes that were hashed.
"""

import fcntl
import hashlib
import os
import signal
import stat
import threading
from pathlib import Path

from ..artifact_format import MANIFEST
from ..errors import ArtifactError, show

CHUNK = 1 << 20
LINK_AT_LEAST = 64 << 20  # bytes; smaller files are copied (no lease, no descriptor held)
F_SETLEASE, F_GETLEASE = 1024, 1025  # Linux fcntl commands (Python's fcntl module has no names for them)
_held: dict[int, tuple[str, "Intake"]] = {}  # every leased descriptor of every open Intake


def check_tree(directory: Path, manifest: dict) -> None:
    """Only regular files and directories, no links, no unlisted file, no directory without a listed
    file in it, and every listed file present with its listed size."""
    files = manifest["files"]
    dirs_needed = {Path(rel).parent.as_posix() for rel in files} - {"."}
    for parent, dirs, names in os.walk(directory):
        for name in sorted(dirs + names):
            path = Path(parent, name)
            mode = path.lstat().st_mode
            rel = path.relative_to(directory).as_posix()
            if stat.S_ISLNK(mode):
                raise ArtifactError(f"{show(path)}: a symbolic link (an artifact holds only regular files)")
            if stat.S_ISDIR(mode):
                if rel not in dirs_needed:
                    raise ArtifactError(f"{show(path)}: a directory that holds no file the manifest lists")
            elif not stat.S_ISREG(mode):
                raise ArtifactError(f"{show(path)}: not a regular file")
            elif rel not in files and rel != MANIFEST:
                raise ArtifactError(f"{show(path)}: not listed in the manifest")
    for rel, entry in sorted(files.items()):
        path = directory / rel
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise ArtifactError(f"{show(path)}: listed in the manifest but missing") from None
        except NotADirectoryError:
            raise ArtifactError(f"{show(path)}: listed in the manifest but missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{show(path)}: listed in the manifest but not a regular file")
        if st.st_size != entry["bytes"]:
            raise ArtifactError(f"{show(path)}: {st.st_size} bytes, manifest says {entry['bytes']}")


def _open_nofollow(directory: Path, rel: str) -> tuple[int, int]:
    """(descriptor of `rel`'s directory, read-only descriptor of `rel`), refusing a link at any component."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        *parts, name = rel.split("/")
        for part in parts:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd, os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _lease_broken(signum, frame) -> None:
    """SIGIO: a leased file is being opened for writing. Let the writer go at once (its open waits for
    the lease otherwise); the Intake holding it voids its verdict."""
    for fd, (rel, intake) in list(_held.items()):
        if fcntl.fcntl(fd, F_GETLEASE) != fcntl.F_RDLCK:
            intake.broken.append(rel)
            intake.release(fd)


class Intake:
    """The private directory's files, hashed once: the large ones hard links held under read leases."""

    def __init__(self, directory: Path, manifest: dict, private: Path):
        self.directory, self.private, self.broken = directory, private, []
        self.leases: dict[int, str] = {}
        self.linked = self.copied = 0  # bytes
        try:
            for rel, entry in sorted(manifest["files"].items()):
                self._take(rel, entry)
        except BaseException:
            self.close()
            raise

    def _take(self, rel: str, entry: dict) -> None:
        path, target = self.directory / rel, self.private / rel
        try:
            parent, fd = _open_nofollow(self.directory, rel)
        except OSError as e:
            raise ArtifactError(f"{show(path)}: cannot be opened as a regular file ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{show(path)}: not a regular file")
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if entry["bytes"] >= LINK_AT_LEAST and self._link(parent, fd, rel, st):
                leased, fd = fd, None  # held until close(): its lease guards the link
                _hash(leased, path, entry, None)
                self.linked += entry["bytes"]
            else:
                with open(target, "wb") as out:
                    _hash(fd, path, entry, out)
                self.copied += entry["bytes"]
        finally:
            os.close(parent)
            if fd is not None:
                os.close(fd)

    def _link(self, parent: int, fd: int, rel: str, st: os.stat_result) -> bool:
        """Lease `fd`, then hard-link the file it is into the private directory; False (and nothing held)
        where the kernel, the filesystem or the thread does not allow it: the file is copied instead."""
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers are the main thread's: no lease without one
        if signal.getsignal(signal.SIGIO) is not _lease_broken:
            signal.signal(signal.SIGIO, _lease_broken)  # SIGIO's default action ends the process
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        except OSError:  # open for writing now, leases disabled, or not the file's owner
            return False
        _held[fd], self.leases[fd] = (rel, self), rel
        target = self.private / rel
        try:
            os.link(rel.rsplit("/", 1)[-1], target, src_dir_fd=parent, follow_symlinks=False)
            linked = os.stat(target, follow_symlinks=False)
            if (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino):
                return True
            os.unlink(target)  # the name was replaced between open and link
        except OSError:  # another filesystem than the private directory's, or links not allowed
            pass
        self.release(fd)
        return False

    def release(self, fd: int) -> None:
        if self.leases.pop(fd, None) is not None:
            _held.pop(fd, None)
            os.close(fd)  # the lease goes with the descriptor

    def check_unchanged(self) -> None:
        """ArtifactError if a leased file was opened for writing since it was hashed."""
        for fd, rel in list(self.leases.items()):
            if fcntl.fcntl(fd, F_GETLEASE) != fcntl.F_RDLCK:
                self.broken.append(rel)
                self.release(fd)
        if self.broken:
            raise ArtifactError(
                f"{show(self.directory / self.broken[0])}: opened for writing while it was being validated "
                "(the bytes judged may not be the bytes hashed): no verdict"
            )

    def close(self) -> None:
        for fd in list(self.leases):
            self.release(fd)


def _hash(fd: int, path: Path, entry: dict, out) -> None:
    """Read `fd` to its end (at most one byte past the listed size), writing to `out` unless None; refuse
    bytes that do not match the manifest's size and sha256."""
    h, size = hashlib.sha256(), 0
    while size <= entry["bytes"]:
        chunk = os.read(fd, min(CHUNK, entry["bytes"] + 1 - size))
        if not chunk:
            break
        h.update(chunk)
        if out is not None:
            out.write(chunk)
        size += len(chunk)
    if size != entry["bytes"]:
        read = f"more than {entry['bytes']}" if size > entry["bytes"] else str(size)
        raise ArtifactError(f"{show(path)}: {read} bytes as read, manifest says {entry['bytes']} (changed)")
    if h.hexdigest() != entry["sha256"]:
        raise ArtifactError(f"{show(path)}: sha256 does not match the manifest (file changed or corrupt)")
