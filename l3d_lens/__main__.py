"""``python -m l3d_lens``: the ``l3d-lens`` command (l3d_lens.cli)."""

import sys

from .cli import main

sys.exit(main())
