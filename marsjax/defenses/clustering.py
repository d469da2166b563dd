"""Moved to :mod:`marsjax.mars.clustering` (MARS's own package); this name stays an alias of that very
module, private names and all."""

import sys

from marsjax.mars import clustering as _module

sys.modules[__name__] = _module
