"""The compiled hot paths, built from ``native/``; each has a pure-Python reference.

``NO_EXTENSIONS`` is the one switch for all of them, read once at import: with the environment
variable ``PLEXUS_NO_EXTENSIONS`` set to anything but ``""`` or ``"0"``, every module that has a
native twin uses its reference instead. Each module also falls back to its reference on its own
when its extension is not built.
"""

from __future__ import annotations

import os

NO_EXTENSIONS: bool = os.environ.get("PLEXUS_NO_EXTENSIONS", "") not in ("", "0")
