"""The old import path of :mod:`vtc.apps.video` (moved with the other applications); it is the same module object."""

import sys

from .apps import video

sys.modules[__name__] = video
