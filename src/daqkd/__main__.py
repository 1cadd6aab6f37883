"""`python -m daqkd`: the same as the `daqkd` command."""

import sys

from .cli import main

sys.exit(main())
