"""`python -m diffseg.cli`: the `diffseg` command."""

import sys

from . import main

sys.exit(main())
