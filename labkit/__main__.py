"""``python -m labkit`` runs the ``labkit`` command line."""

import sys

from labkit.cli import main

sys.exit(main())
