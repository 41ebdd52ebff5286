"""Output paths checked before any work, so a finished run is never lost to a bad ``--out``."""

from __future__ import annotations

import os
from pathlib import Path


def check_writable_folder(folder: str | Path, what: str) -> None:
    """``folder`` is, or can be made as, a writable folder (its missing parents are made later).
    ``what`` names the argument in the error, e.g. "--out 'runs/x.parquet'"."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: the folder {str(existing)!r} is not writable")


def check_output_file(path: str | Path, what: str) -> None:
    """``path`` can be written as a file: not a folder, not read-only, its folder writable."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{what}: {str(out)!r} is a folder; expected a file name")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{what}: {str(out)!r} exists and is not writable")
    check_writable_folder(out.parent, what)
