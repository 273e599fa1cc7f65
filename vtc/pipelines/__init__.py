"""The old import path of :mod:`vtc.apps.pipelines` (moved with the other applications), submodules included."""

import sys

from ..apps import pipelines
from ..apps.pipelines import qa, report, results, videoqa

for _module in (qa, report, results, videoqa):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
sys.modules[__name__] = pipelines
