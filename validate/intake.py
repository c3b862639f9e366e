"""Read an artifact's files once.

The directory is walked without following links; each listed file is opened without following links
(every path component), read once, hashed while it is copied into a private directory (0700, made by
`tempfile`), and compared with the manifest. Everything after this reads the private copy only: the
parsers, the runtimes and the rebuild's comparison get exactly the bytes that were hashed, whatever
happens to the artifact directory meanwhile.
"""

import hashlib
import os
import stat
from pathlib import Path

from ..artifact_format import MANIFEST
from ..errors import ArtifactError, show

CHUNK = 1 << 20


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


def _open_nofollow(directory: Path, rel: str) -> int:
    """A read-only descriptor of `rel` under `directory`, refusing a link at any component."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        *parts, name = rel.split("/")
        for part in parts:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def copy_verified(directory: Path, manifest: dict, private: Path) -> None:
    """Copy every listed file into `private`, hashing the bytes as they are copied; refuse a file whose
    bytes (as read, once) do not match the manifest's size and sha256."""
    for rel, entry in sorted(manifest["files"].items()):
        path = directory / rel
        try:
            fd = _open_nofollow(directory, rel)
        except OSError as e:
            raise ArtifactError(f"{show(path)}: cannot be opened as a regular file ({e.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ArtifactError(f"{show(path)}: not a regular file")
            target = private / rel
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            h, size = hashlib.sha256(), 0
            with open(target, "wb") as out:
                while size <= entry["bytes"]:
                    chunk = os.read(fd, min(CHUNK, entry["bytes"] + 1 - size))
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        finally:
            os.close(fd)
        if size != entry["bytes"]:
            read = f"more than {entry['bytes']}" if size > entry["bytes"] else str(size)
            raise ArtifactError(
                f"{show(path)}: {read} bytes as read, manifest says {entry['bytes']} (changed)"
            )
        if h.hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{show(path)}: sha256 does not match the manifest (file changed or corrupt)")
