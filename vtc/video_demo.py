"""The old import path of :mod:`vtc.apps.video_demo` (moved with the other applications): the same module."""

import sys

from .apps import video_demo

sys.modules[__name__] = video_demo
