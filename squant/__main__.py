"""``python -m squant``: the same as the ``squant`` console script."""

import sys

from .cli import main

sys.exit(main())
