"""``python -m vitkit.cli ...`` (used by torchrun, which launches modules)."""

import sys

from vitkit.cli import main

sys.exit(main())
