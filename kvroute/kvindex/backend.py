"""Which implementation of the ground floor runs: the compiled core or the pure-Python reference.

* ``native``: the C++ extension :mod:`kvroute.kvindex._kvcore` (built by ``pip install -e .``),
  wrapped by :mod:`.native`.
* ``python``: the reference implementation (:mod:`.index`, :mod:`.hashing`,
  :mod:`kvroute.router.pending`), which the tests compare the compiled core with.

``KVROUTE_PURE_PYTHON=1`` selects the reference.  An extension that fails to import gives one
warning and the reference.  :data:`BACKEND` says which one runs (``kvroute --version`` and the
sidecar's ``/health`` report it); :data:`core` is the extension module or None.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

from .errors import InvalidHashError, InvalidTokensError

#: The extension module when the compiled backend runs, else None.
core: ModuleType | None = None
#: Why the compiled core is not used (None when it is).
reason: str | None = None

if os.environ.get("KVROUTE_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on"):
    reason = "KVROUTE_PURE_PYTHON is set"
else:
    try:
        from . import _kvcore as core  # type: ignore[no-redef]

        core.set_error_types(InvalidTokensError, InvalidHashError)
    except ImportError as exc:  # not built (e.g. a source tree without `pip install -e .`)
        core = None
        reason = f"the compiled core failed to import ({exc}); using the pure-Python backend"
        warnings.warn(f"kvroute: {reason}", RuntimeWarning, stacklevel=2)

#: ``"native"`` or ``"python"``.
BACKEND = "native" if core is not None else "python"
