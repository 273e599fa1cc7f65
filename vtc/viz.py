"""The old import path of :mod:`vtc.apps.viz` (moved with the other applications); it is the same module object."""

import sys

from .apps import viz

sys.modules[__name__] = viz
