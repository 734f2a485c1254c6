"""Atomic file writes: a temporary file in the same folder, renamed into place.

A reader (or a rerun after a crash) sees the old file or the whole new one, never half of one, which
is what lets every batch job here skip finished work safely.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, *, suffix: str = "") -> Iterator[pathlib.Path]:
    """Yields a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    ``suffix`` keeps an extension on the temporary name for writers that infer the format from it
    (PIL, matplotlib).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: os.PathLike | str, data: bytes | str, *, fsync: bool = False) -> None:
    """Writes ``data`` (str is UTF-8 encoded) atomically; ``fsync`` also flushes it to the disk."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    write_bytes_atomic(path, text)


def write_json_atomic(path: os.PathLike | str, obj: Any, **dumps_kwargs) -> None:
    """``json.dumps(obj, indent=1, **dumps_kwargs)`` plus a final newline, written atomically."""
    dumps_kwargs.setdefault("indent", 1)
    write_bytes_atomic(path, json.dumps(obj, **dumps_kwargs) + "\n")
