"""Stream a directory as a tar (optionally gzip) archive, built on the fly in bounded memory.

Only regular files inside the directory go in, under relative names: symbolic links are never
followed (neither as files nor as directories), so an archive cannot leak anything outside the
job's artifact dir. Each file is opened with O_NOFOLLOW and archived with the size fstat reports.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 20 blocks


class UnsafePath(ValueError):
    """The directory is missing, is a link, or lies outside its root."""


def safe_directory(root: Path, relative: str) -> Path:
    """``root/relative`` if it is a real directory inside ``root`` (no '..', no links on the way)."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise UnsafePath(f"refusing path {relative!r}")
    target = root / rel
    real_root = os.path.realpath(root)
    if os.path.realpath(target) != os.path.join(real_root, os.path.normpath(rel)).rstrip(os.sep):
        raise UnsafePath(f"{relative!r} goes through a symbolic link")
    if not target.is_dir():
        raise UnsafePath(f"{relative!r} is not a directory")
    return target


def _regular_files(top: Path) -> Iterator[tuple[str, str]]:
    """(absolute path, relative name) of regular files under ``top``, sorted, links skipped."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                yield path, os.path.relpath(path, top)


def _tar_stream(top: Path, arcroot: str) -> Iterator[bytes]:
    written = 0
    for path, rel in _regular_files(top):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # replaced by a link or removed since the walk
            continue
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                continue
            info = tarfile.TarInfo(f"{arcroot}/{rel}")
            info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            yield header
            remaining = st.st_size
            while remaining > 0:  # exactly the announced size, even if the file changes
                chunk = fh.read(min(CHUNK, remaining)) or b"\0" * min(CHUNK, remaining)
                remaining -= len(chunk)
                yield chunk
            pad = -st.st_size % BLOCK
            if pad:
                yield b"\0" * pad
            written += len(header) + st.st_size + pad
    end = 2 * BLOCK
    yield b"\0" * (end + (-(written + end) % RECORD))


def stream_directory(top: Path, arcroot: str, *, compress: bool = True) -> Iterator[bytes]:
    """The archive's bytes, a chunk at a time: ``arcroot/<relative path>`` for every regular file."""
    if not compress:
        yield from _tar_stream(top, arcroot)
        return
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip container
    for chunk in _tar_stream(top, arcroot):
        out = gz.compress(chunk)
        if out:
            yield out
    yield gz.flush()
