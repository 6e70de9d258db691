"""``python -m evomerge``: the evomerge CLI."""

import sys

from evomerge.search.cli import main

sys.exit(main())
