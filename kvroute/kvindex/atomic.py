"""Atomic file replacement: the one way kvroute writes files that must never be seen half-written.

:func:`atomic_write` writes to a temporary file in the target's directory,
fsyncs it and renames it over the target, so a reader (or a crash) sees the old
file or the new one, never a mix.  Used by :meth:`kvroute.KVIndex.save` and by
the sidecar for the stream positions saved beside a snapshot.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes], *, prefix: str = ".kvroute-") -> None:
    """Write ``chunks`` to ``path`` atomically (temp file + fsync + rename); the temp file never stays behind."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
