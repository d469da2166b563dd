"""Moved to :mod:`marsjax.mars.defense` (MARS's own package); this name stays an alias of that
very module (the registry's ``_build`` / ``_build_star`` included)."""

import sys

from marsjax.mars import defense as _module

sys.modules[__name__] = _module
