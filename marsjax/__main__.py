"""``python -m marsjax ...``: the ``marsjax`` command, for environments where it is not installed."""

import sys

from marsjax.cli import main

sys.exit(main())
