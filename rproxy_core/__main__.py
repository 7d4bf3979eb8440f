"""``python -m rproxy_core`` runs the rproxy command."""

import sys

from .cli import main

sys.exit(main())
