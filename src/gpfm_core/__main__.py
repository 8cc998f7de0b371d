"""``python -m gpfm_core`` is the ``gpfm`` CLI."""

import sys

from gpfm_core.cli import main

sys.exit(main())
