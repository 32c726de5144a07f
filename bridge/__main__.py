"""``python -m bridge …`` is the ``hfmb`` command (``bridge/cli/``)."""

import sys

from bridge.cli import main

if __name__ == "__main__":  # spawned helper processes re-import this module; only the real entry runs
    sys.exit(main())
