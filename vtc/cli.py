"""The old import path of :mod:`vtc.apps.cli` (moved with the other applications); ``python -m vtc.cli`` runs it."""

import sys

from .apps import cli

if __name__ == "__main__":
    sys.exit(cli.main())
sys.modules[__name__] = cli
