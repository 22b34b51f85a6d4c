"""``python -m dtlab ...`` (and ``torchrun -m dtlab ...``): the ``dtlab`` command line."""

import sys

from dtlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
