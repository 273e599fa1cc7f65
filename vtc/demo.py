"""The old import path of :mod:`vtc.apps.demo` (moved with the other applications); it is the same module object."""

import sys

from .apps import demo

sys.modules[__name__] = demo
