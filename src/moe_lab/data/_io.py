"""File-system helpers for the data modules: safe names, writable dirs, atomic cache files."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from moe_lab.utils.io import atomic_write


def check_path_name(name: str, what: str = "dataset name") -> str:
    """Return ``name`` if it is ONE plain path component, else raise ValueError.

    A name that becomes a path under the data dir must not escape it: no ``..`` or ``.``, no
    separators, not absolute, not empty.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or len(posix.parts) != 1
        or len(windows.parts) != 1
        or name in {".", ".."}
        or "\x00" in name
    ):
        raise ValueError(
            f"{what} {name!r} is not a plain file name: it must not be absolute or contain "
            "'..', '.', '/' or '\\' (it becomes a folder inside the data dir and must stay there)"
        )
    return name


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and check a file can be written in it; raise ValueError if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test_")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"data dir {str(path)!r} is not a writable directory ({err.strerror or err}). "
            "Point data.data_dir (or paths.data_dir) at a folder you can write to."
        ) from None
    return path


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` (.npz) through a temporary file in the same folder and a rename,
    so a crash or a concurrent writer never leaves half a file behind."""
    ensure_writable_dir(path.parent)
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Load ``keys`` from an .npz cache, or return None when the file is missing or unreadable
    (the caller regenerates it)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
