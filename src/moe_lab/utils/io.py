"""Atomic writes: a reader (or a crash) never sees half a file.

Each writer puts the bytes in a temporary file in the destination's directory, flushes and fsyncs
it, then renames it over the destination with ``os.replace`` (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block ends (they are delivered then), so that a stop
    request never lands half-way through a write that must finish, e.g. a run's checkpoints."""
    main = threading.current_thread() is threading.main_thread()
    if not main or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _WriteRecorder:
    """A binary file that remembers the OSError a write raised: torch.save reports a failed write
    as a bare ``RuntimeError: ... file write failed``, which would hide ENOSPC and the path."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then rename it to ``path``.

    A failing write (a full disk, say) leaves ``path`` as it was, removes the temporary file and
    raises an ``OSError`` that names ``path`` (``errno.ENOSPC``: "No space left on device").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    recorder: _WriteRecorder | None = None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                write(recorder)  # type: ignore[arg-type]
            except OSError:
                raise
            except Exception as err:  # torch.save's RuntimeError around a failed write
                if recorder.error is None:
                    raise
                raise _named(recorder.error, path) from err
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        named = _named(err, path)
        if named is err:
            raise
        raise named from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _named(err: OSError, path: Path) -> OSError:
    """``err`` as an OSError of the same kind that names the destination ``path``."""
    if err.filename == str(path):
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


#: suffix of atomic_write's temporary files
TMP_SUFFIX = ".tmp"


def remove_stale_tmp_files(
    folder: str | os.PathLike[str], subdirs: tuple[str, ...] = ()
) -> list[Path]:
    """Delete temporary files that atomic writes left behind when a process was killed mid-write
    (``.<name>.<random>.tmp`` in ``folder`` and its ``subdirs``); returns what was removed.

    Only call this where no other process writes (a run's own dir at its start)."""
    removed = []
    for where in (Path(folder), *(Path(folder) / s for s in subdirs)):
        if not where.is_dir():
            continue
        for p in where.glob(f".*{TMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _json_safe(value: Any) -> Any:
    """Strict JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """``data`` as the JSON text every moe_lab record is written as (indented, no NaN)."""
    return json.dumps(_json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json_text(data))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_together(files: dict[Path, bytes]) -> None:
    """Write every ``path: bytes`` of ``files`` so that the set changes at once or not at all.

    All files go to temporary files beside their targets first (a full disk or a crash fails
    here, before any target changes); the old targets are kept as hard links (copies where links
    are not possible); then each temporary file is renamed over its target, and a failed rename
    puts back the targets already renamed. Temporary files never stay behind.
    """
    umask = _current_umask()
    staged: dict[Path, Path] = {}
    backups: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged[path] = Path(tmp)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for path in files:
            if not path.exists():
                continue
            fd, bak = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".old.tmp", dir=path.parent)
            os.close(fd)
            backups[path] = Path(bak)
            try:
                os.unlink(bak)
                os.link(path, bak)
            except OSError:
                shutil.copy2(path, bak)
        renamed: list[Path] = []
        try:
            for path, tmp in staged.items():
                os.replace(tmp, path)
                renamed.append(path)
        except BaseException:
            for path in reversed(renamed):
                if path in backups:
                    os.replace(backups.pop(path), path)
                else:
                    path.unlink(missing_ok=True)
            raise
    finally:
        for leftover in (*staged.values(), *backups.values()):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
