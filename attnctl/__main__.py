"""`python -m attnctl ...` (and `accelerate launch -m attnctl render ...`): the `attnctl` command line."""

import sys

from .render.cli import main

sys.exit(main())
