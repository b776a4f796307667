"""``python -m vramq``: the same as the ``vramq`` command."""

import sys

from vramq.cli import main

sys.exit(main())
