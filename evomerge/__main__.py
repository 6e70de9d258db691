"""``python -m evomerge``: the evomerge CLI."""

import sys

from evomerge.search.app.cli import main

sys.exit(main())
