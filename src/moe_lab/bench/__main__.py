"""``python -m moe_lab.bench``."""

import sys

from . import main

sys.exit(main())
