"""``python -m vitkit.bench ...``: the same as ``vitkit bench ...``."""

import sys

from vitkit.cli.main import main

sys.exit(main(["bench", *sys.argv[1:]]))
