"""The old import path of :mod:`vtc.apps.lmms_eval` (the lmms-eval plugin; moved with the other applications).

The ``lmms_eval.models`` entry point of an install made before the move names this path. The wrapper modules
import lmms-eval itself, so only the dependency-free ones are aliased here.
"""

import sys

from ...apps import lmms_eval
from ...apps.lmms_eval import args

sys.modules[f"{__name__}.args"] = args
sys.modules[__name__] = lmms_eval
