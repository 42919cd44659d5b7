"""Built-in policies; importing this package registers them."""
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .keydiff import KeyDiff
from .kvzip import KVzip, KVzipFloor
from .prefixkv import PrefixKV, calibrate
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .spankv import SpanKV
from .streamingllm import StreamingLLM
from .tova import TOVA
from .uniform import Uniform
from .vlcache import VLCache

__all__ = ["ExpectedAttention", "H2O", "KVzip", "KVzipFloor", "KeyDiff", "PrefixKV", "PyramidKV",
           "SnapKV", "SpanKV", "StreamingLLM", "TOVA", "Uniform", "VLCache", "calibrate"]
