"""Atomic file and folder writes: readers see the old state or the new one, never half of either."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_exchange():
    """`exchange(a, b)`: swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> None:
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(a), None, str(b))

    return exchange


_exchange = _load_exchange()
# The kernel or file system cannot exchange (old kernel, some network file systems): rename twice.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover_dir(path: str | os.PathLike, leftovers: bool = False) -> None:
    """Finish what a crashed `atomic_dir` overwrite left behind; call before reading or replacing `path`.

    Without rename-exchange an overwrite renames `path` to `.NAME.old`, then the new folder to `path`.
    A crash between the two leaves `.NAME.old` as the only copy: it is moved back. A `.NAME.old` next
    to a `path` is a finished overwrite's leftover and is deleted. With `leftovers`, temp folders of
    writers that no longer run are deleted too (only a writer should: it owns the parent folder).
    """
    path = Path(path)
    old = _old(path)
    if os.path.lexists(old):
        if not os.path.lexists(path):
            with contextlib.suppress(FileNotFoundError):  # another process may have just done it
                os.replace(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True)
    if not leftovers or not path.parent.is_dir():
        return
    prefix = _temp_prefix(path)
    for entry in os.scandir(path.parent):
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp") and entry.is_dir(follow_symlinks=False)):
            continue
        pid = name[len(prefix):-len(".tmp")].rpartition(".")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace `path` by `tmp` so that a crash at any point leaves one complete folder at `path`
    (or, without rename-exchange, a `.NAME.old` that `recover_dir` moves back)."""
    if _exchange is not None:
        try:
            _exchange(tmp, path)  # path: the new folder; tmp: the old one, deleted below
        except OSError as e:
            if e.errno not in _NO_EXCHANGE:
                raise
        else:
            _fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
    old = _old(path)
    os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it becomes `path`.

    An existing `path` is replaced only with `overwrite`, in one atomic rename-exchange where the
    OS has it; a crash at any point leaves the old folder or the new one in place (see `recover_dir`
    for systems without it). On error the temp folder is removed and `path` is left as it was.
    """
    path = Path(path)
    recover_dir(path, leftovers=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another folder or pass overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets a later write tell a crashed writer's leftovers from a running one's
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=f".{os.getpid()}.tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        if os.path.lexists(path):
            _swap_in(tmp, path)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
