"""Writing files and folders so that readers never see half of one."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moec.errors import MoecError


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename it over `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MoecError(f"cannot write {path}: folder {path.parent} does not exist")
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


@contextmanager
def staging_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh folder beside `out`; on success it takes `out`'s place in one atomic
    exchange, on failure it is removed, and the previous `out` is untouched either way. A
    process killed outright (SIGKILL) cannot clean up: the folders it left (named with its pid)
    are removed by the next run for the same `out`."""
    if out.exists() and not force:
        raise MoecError(f"output folder {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield staging
        if not out.exists():
            staging.rename(out)
        elif not _exchange(staging, out):  # no renameat2: a moment without `out`, never a broken one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_abandoned(out: Path) -> None:
    """Remove staging folders beside `out` whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)-")
    for entry in out.parent.iterdir():
        found = pattern.match(entry.name)
        if found and entry.is_dir() and not _alive(int(found[2])):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
