"""``python -m search``: the evomerge CLI."""

import sys

from search.cli import main

sys.exit(main())
