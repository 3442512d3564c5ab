"""`python -m cifarcnn` (and `torchrun -m cifarcnn`) run the CLI."""

import sys

from .cli import main

sys.exit(main())
