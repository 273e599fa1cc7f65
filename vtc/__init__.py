"""vtc: training-free visual-token compression for vision-language models on stock ``transformers``.

>>> model = vtc.compress(model, method="hired", budget=0.2)   # in place
>>> model.generate(**inputs)                                   # stock generate, KV cache and all
>>> vtc.restore(model)                                         # bit-exact undo
"""

__version__ = "0.1.0"

from . import flops, mergers, pruners  # noqa: F401,E402  (pruners and mergers register the methods)
from .api import (  # noqa: E402
    DEFAULT_METHOD,
    compress,
    compressed,
    is_compressed,
    last_record,
    list_methods,
    method_for,
    restore,
    session_of,
)
from .budget import keep_count, validate_budget  # noqa: E402
from .config import MethodConfig  # noqa: E402
from .contexts import ImageTokens, Layout, Reduction, Stage, VisionSignal  # noqa: E402
from .method import Method  # noqa: E402
from .record import ImageRecord, Record, SampleRecord  # noqa: E402
from .registry import get_method, register_method  # noqa: E402
from .stack import StackConfig  # noqa: E402

__all__ = [
    "DEFAULT_METHOD",
    "compress",
    "restore",
    "compressed",
    "is_compressed",
    "session_of",
    "last_record",
    "list_methods",
    "method_for",
    "get_method",
    "register_method",
    "Method",
    "keep_count",
    "validate_budget",
    "MethodConfig",
    "Record",
    "ImageRecord",
    "SampleRecord",
    "Stage",
    "VisionSignal",
    "Layout",
    "ImageTokens",
    "Reduction",
    "StackConfig",
]
