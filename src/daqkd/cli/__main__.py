"""`python -m daqkd.cli`: the same as the `daqkd` command."""

import sys

from . import main

sys.exit(main())
