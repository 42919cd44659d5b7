import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/strategies.py for the property tests

# Without a GPU the Triton kernels run numpy-interpreted; TRITON_INTERPRET must be set before
# triton is first imported, so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
