"""The old import path of :mod:`vtc.contexts` (the hook-point contexts); it is the same module object."""

import sys

from . import contexts

sys.modules[__name__] = contexts
