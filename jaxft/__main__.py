"""`python -m jaxft ...`: the `jaxft` command."""

import sys

from jaxft.cli import main

sys.exit(main())
