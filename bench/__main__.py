"""``python -m bench SUITE [flags]``, the same as ``plexus bench SUITE [flags]``."""

import sys

from bench.run import main

sys.exit(main(prog="python -m bench"))
