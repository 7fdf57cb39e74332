"""``python -m flr_engine.cli``: the ``flr`` command."""

import sys

from flr_engine.cli import main

sys.exit(main())
