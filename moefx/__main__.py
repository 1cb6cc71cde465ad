"""``python -m moefx``: the same as the ``moefx`` command."""

import sys

from .cli import main

sys.exit(main())
