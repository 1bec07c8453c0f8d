"""Test-wide setup: Triton kernels run on CPU through the interpreter when no GPU is present.

The variable must be set before Triton is first imported, hence here, at collection start.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
