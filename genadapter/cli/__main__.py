"""`python -m genadapter.cli`: the `genadapter` command."""

import sys

from . import main

sys.exit(main())
