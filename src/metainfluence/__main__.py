"""``python -m metainfluence …``: the same command line as the ``metainfluence`` script."""

import sys

from .cli import main

sys.exit(main())
