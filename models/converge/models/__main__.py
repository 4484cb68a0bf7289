"""`python -m converge.models ...`: the `converge models` commands standalone."""

import sys

from converge.models.cli import main

sys.exit(main())
