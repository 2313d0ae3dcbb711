"""`python -m attnctl ...` (and `accelerate launch -m attnctl render ...`): the `attnctl` command line."""

import sys

from .pipelines.cli import main

sys.exit(main())
