"""``python -m altpo.cli ...``: the same as the ``altpo-fast`` command (torchrun launches this)."""

import sys

from altpo.cli import main

sys.exit(main())
