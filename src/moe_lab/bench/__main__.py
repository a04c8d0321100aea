"""``python -m moe_lab.bench``."""

import sys

from .cli import main

sys.exit(main())
