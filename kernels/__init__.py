"""Triton device code of entangle_fast, installed as `entangle_fast.kernels`.

Importing this package never needs a GPU and never fails for want of Triton (macOS, CPU-only
installs): `HAS_TRITON` says whether the launchers below were importable.
"""

try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True

if HAS_TRITON:
    from .ghost_gram import ghost_gram_fwd
    from .logprob import logprob_bwd, logprob_fwd
    from .pair_wgrad import pair_wgrad

    __all__ = ["HAS_TRITON", "logprob_fwd", "logprob_bwd", "ghost_gram_fwd", "pair_wgrad"]
else:
    __all__ = ["HAS_TRITON"]
