"""`python -m astarpo` (and `accelerate launch -m astarpo ...`) runs the command line."""

import sys

from .cli import main

sys.exit(main())
