"""``python -m moefx.cli``: the same as the ``moefx`` command."""

import sys

from . import main

sys.exit(main())
