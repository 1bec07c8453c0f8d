"""The CUDA C++ backend (``csrc/``): build, ``torch.library`` registration, and launchers.

Vertical slice, the same names as the Triton side: ``csrc/logprob.cu`` (plain CUDA kernels on raw pointers) ->
``csrc/bindings.cpp`` (checks, pointers, stream) -> the custom ops ``entangle_fast::logprob_fwd`` /
``entangle_fast::logprob_bwd`` / ``entangle_fast::ghost_gram`` registered here, each with a fake (meta)
implementation so ``torch.compile`` traces them -> the launchers :func:`cuda_logprob_fwd`, :func:`cuda_logprob_bwd`
and :func:`cuda_ghost_gram_fwd`, whose signatures and contracts are those of ``kernels/logprob.py`` and
``kernels/ghost_gram.py``.

Importing this module registers the op schemas and fakes and nothing else: it queries no device and builds nothing.
The extension is loaded on the first real call: the ahead-of-time module ``entangle_fast._cuda_C`` if
``ENTANGLE_FAST_BUILD_CUDA=1`` built one at install, else a just-in-time build of ``csrc/`` with
``torch.utils.cpp_extension.load`` (ninja; cached in torch's extensions directory, ``TORCH_EXTENSIONS_DIR`` to move
it; ``MAX_JOBS`` caps the parallel jobs; ``ENTANGLE_FAST_CUDA_ARCH_LIST`` picks the architectures). See docs/cuda.md.
"""
# No `from __future__ import annotations`: torch.library reads the op schemas from real annotation objects.
import importlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from entangle_fast._contract import (
    check_ghost_gram_inputs,
    check_logprob_bwd_call,
    check_logprob_inputs,
    check_pair_wgrad_inputs,
    check_placement,
    check_transform,
)

JIT_NAME = "entangle_fast_cuda"
AOT_NAME = "entangle_fast._cuda_C"

_lock = threading.Lock()
_module = None


# ---------------------------------------------------------------------------------------------------------------------
# Availability and build
# ---------------------------------------------------------------------------------------------------------------------


def csrc_dir() -> Optional[Path]:
    """Where the CUDA sources are: packaged beside this module (wheel) or at the repository root (source checkout)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "build.py").is_file() and (cand / "logprob.cu").is_file():
            return cand
    return None


def _build_settings():
    """csrc/build.py, the flags shared with the ahead-of-time build (loaded by path: csrc/ is not a package)."""
    src = csrc_dir()
    if src is None:
        raise RuntimeError("entangle_fast's CUDA sources (csrc/) are not installed with this copy of the package")
    spec = importlib.util.spec_from_file_location("_entangle_fast_csrc_build", src / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prebuilt_present() -> bool:
    try:
        return importlib.util.find_spec(AOT_NAME) is not None
    except (ImportError, ValueError):
        return False


def _nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None:
        path = Path(CUDA_HOME) / "bin" / "nvcc"
        if path.is_file():
            return str(path)
    return shutil.which("nvcc")


def cuda_available(device=None) -> Tuple[bool, str]:
    """Whether ``impl="cuda"`` can run here (on ``device``, default the current CUDA device), and why not.

    Checks, in order: a CUDA build of torch, a visible device, compute capability >= 8.0, then either the prebuilt
    extension or the sources plus nvcc for a just-in-time build. Does not build anything, so a True can still be
    followed by a compile error on the first call (raised there, with nvcc's output).
    """
    if torch.version.cuda is None:
        return False, (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
                       "the CUDA backend needs a CUDA build of torch")
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    index = None
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return False, f"impl='cuda' needs CUDA tensors, got device {device}"
        index = device.index
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return False, (f"the CUDA kernels need compute capability >= 8.0 (bf16 tensor cores); "
                       f"{torch.cuda.get_device_name(index)} is {major}.{minor}")
    if _prebuilt_present():
        return True, f"prebuilt extension {AOT_NAME}"
    if csrc_dir() is None:
        return False, ("neither the prebuilt extension (ENTANGLE_FAST_BUILD_CUDA=1 at install) nor the CUDA sources "
                       "(csrc/) for a just-in-time build are installed")
    if _nvcc() is None:
        return False, ("nvcc was not found (set CUDA_HOME or put nvcc on PATH) and there is no prebuilt extension "
                       "(install with ENTANGLE_FAST_BUILD_CUDA=1)")
    return True, "just-in-time build of csrc/ on first use"


def _jit_archs(settings) -> list:
    """ENTANGLE_FAST_CUDA_ARCH_LIST if set; else the default list plus the local GPU when the list does not run on it
    (sm_80 code runs on every 8.x GPU; a 10.x or 12.x GPU needs its own)."""
    if os.environ.get("ENTANGLE_FAST_CUDA_ARCH_LIST", "").strip():
        return settings.arch_list()
    archs = settings.arch_list(settings.DEFAULT_ARCH_LIST)
    major, minor = torch.cuda.get_device_capability()
    covered = any(int(a.split(".")[0]) == major and int(a.split(".")[1][0]) <= minor for a in archs)
    return archs if covered else [*archs, f"{major}.{minor}"]


def load_extension(verbose: bool = False):
    """The compiled extension module, building it just in time on the first call (minutes; cached afterwards)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            ok, reason = cuda_available()
            if not ok:
                raise RuntimeError(f"entangle_fast's CUDA backend cannot run here: {reason}")
            try:
                _module = importlib.import_module(AOT_NAME)
            except ImportError:
                _module = _jit_build(verbose)
    return _module


def _jit_build(verbose: bool):
    from torch.utils.cpp_extension import load

    settings = _build_settings()
    src = csrc_dir()
    return load(
        name=JIT_NAME,
        sources=[str(src / s) for s in settings.SOURCES],
        extra_cflags=settings.cxx_flags(),
        extra_cuda_cflags=settings.nvcc_flags(_jit_archs(settings)),
        extra_include_paths=[str(src)],
        verbose=verbose or os.environ.get("ENTANGLE_FAST_CUDA_VERBOSE", "0") == "1",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: CUDA implementations (the extension) and fake implementations (shapes only)
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("entangle_fast::logprob_fwd", mutates_args=(), device_types="cuda")
def _logprob_fwd_op(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int,
                    scale: float, softcap: float, metrics: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    outs = load_extension().logprob_fwd(hidden, weight, labels, bias, ignore_index, scale, softcap, metrics)
    return tuple(outs)


@_logprob_fwd_op.register_fake
def _logprob_fwd_fake(hidden, weight, labels, bias, ignore_index, scale, softcap, metrics):
    n = hidden.shape[0]
    m = n if metrics else 0
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((n,), **f32), hidden.new_empty((n,), **f32), hidden.new_empty((m,), **f32),
            hidden.new_empty((m,), **f32), hidden.new_empty((m,), dtype=torch.int64))


@torch.library.custom_op(
    "entangle_fast::logprob_bwd",
    mutates_args=("grad_hidden_unscaled", "grad_weight", "grad_bias", "probs_out", "delta_out"),
    device_types="cuda",
)
def _logprob_bwd_op(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], lse: Tensor,
                    grad_logprobs: Tensor, ignore_index: int, grad_hidden_unscaled: Tensor,
                    grad_weight: Optional[Tensor], grad_bias: Optional[Tensor], vocab_start: int, vocab_end: int,
                    probs_out: Optional[Tensor], scale: float, softcap: float, delta_out: Optional[Tensor]) -> None:
    load_extension().logprob_bwd(hidden, weight, labels, bias, lse, grad_logprobs, ignore_index,
                                 grad_hidden_unscaled, grad_weight, grad_bias, vocab_start, vocab_end, probs_out,
                                 scale, softcap, delta_out)


@_logprob_bwd_op.register_fake
def _logprob_bwd_fake(hidden, weight, labels, bias, lse, grad_logprobs, ignore_index, grad_hidden_unscaled,
                      grad_weight, grad_bias, vocab_start, vocab_end, probs_out, scale, softcap, delta_out):
    return None


@torch.library.custom_op("entangle_fast::ghost_gram", mutates_args=(), device_types="cuda")
def _ghost_gram_op(a: Optional[Tensor], gamma: Tensor, ids: Optional[Tensor], cu_seqlens: Tensor, seg_pairs: Tensor,
                   tmax_i: int, tmax_j: int, positions: bool) -> Tuple[Tensor, Tensor]:
    values, pos = load_extension().ghost_gram(a, gamma, ids, cu_seqlens, seg_pairs, tmax_i, tmax_j, positions)
    return values, pos


@_ghost_gram_op.register_fake
def _ghost_gram_fake(a, gamma, ids, cu_seqlens, seg_pairs, tmax_i, tmax_j, positions):
    n_pairs = seg_pairs.shape[0]
    pos_shape = (n_pairs, tmax_i, tmax_j) if positions else (0, 0, 0)
    return gamma.new_empty((n_pairs,), dtype=torch.float32), gamma.new_empty(pos_shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers (the contracts of kernels/logprob.py and kernels/ghost_gram.py)
# ---------------------------------------------------------------------------------------------------------------------


def cuda_logprob_fwd(hidden, weight, labels, bias, ignore_index, *, scale=1.0, softcap=0.0, metrics=False):
    """Token log-probs of `labels` under softmax(f(hidden @ weight.T + bias)), never forming [N, V] (CUDA C++).

    The contract of ``entangle_fast.kernels.logprob.logprob_fwd``: hidden [N, d], weight [V, d], bias [V] or None,
    one dtype among fp32/bf16/fp16, contiguous, on one CUDA device; labels int64 [N], rows equal to ignore_index get
    logprob 0.0, other labels must lie in [0, V); f(l) = scale * l, then softcap * tanh(. / softcap) when softcap > 0.
    Returns (logprobs, lse), both fp32 [N]; with metrics (logprobs, lse, entropy, logit_sum, argmax int64), all [N].
    """
    _, _, _, named = check_logprob_inputs(hidden, weight, labels, bias)
    check_placement(named, "cuda")
    scale, softcap = check_transform(scale, softcap)
    outs = torch.ops.entangle_fast.logprob_fwd(hidden, weight, labels, bias, int(ignore_index), scale, softcap,
                                               bool(metrics))
    return tuple(outs) if metrics else (outs[0], outs[1])


def cuda_logprob_bwd(hidden, weight, labels, bias, lse, grad_logprobs, ignore_index, *,
                     grad_hidden_unscaled, grad_weight, grad_bias, vocab_start, vocab_end, probs_out,
                     scale=1.0, softcap=0.0, delta_out=None):
    """Accumulate the log-prob gradients of vocab columns [vocab_start, vocab_end) into fp32 buffers (CUDA C++).

    The contract of ``entangle_fast.kernels.logprob.logprob_bwd``: with du = f'(l) (e_y - p),
    grad_hidden_unscaled [N, d] += du @ W[range], grad_weight [V, d] (or [vocab_end - vocab_start, d], row 0 holding
    vocab_start) += (g du)^T @ hidden (rows in range; or None), grad_bias [V] += sum_n g du (or None),
    probs_out [N, vocab_end - vocab_start] = p and delta_out (same shape) = du (0.0 on ignored rows; or None).
    """
    n, width = check_logprob_bwd_call(
        "cuda", hidden, weight, labels, bias, lse=lse, grad_logprobs=grad_logprobs,
        grad_hidden_unscaled=grad_hidden_unscaled, grad_weight=grad_weight, grad_bias=grad_bias,
        vocab_start=vocab_start, vocab_end=vocab_end, probs_out=probs_out, delta_out=delta_out)
    scale, softcap = check_transform(scale, softcap)
    if n == 0 or width == 0:
        return
    torch.ops.entangle_fast.logprob_bwd(hidden, weight, labels, bias, lse, grad_logprobs, int(ignore_index),
                                        grad_hidden_unscaled, grad_weight, grad_bias, vocab_start, vocab_end,
                                        probs_out, scale, softcap, delta_out)


def cuda_ghost_gram_fwd(a, gamma, ids, cu_seqlens, seg_pairs, *, positions: bool = False):
    """Ghost Gram values (and optionally the per-(tau, sigma) terms) of segment pairs (CUDA C++ kernel).

    The contract of ``entangle_fast.kernels.ghost_gram.ghost_gram_fwd``: a [S, d_in] or None, gamma [S, d_out] in
    one dtype among fp32/bf16/fp16; ids int64 [S] or None; cu_seqlens int64 [n_seg + 1] and seg_pairs int64 [P, 2]
    already validated (entangle_fast.ghost.ghost_gram). Returns (values fp32 [P], position_matrix fp32
    [P, Tmax_i, Tmax_j] or None), zero-padded.
    """
    check_placement(check_ghost_gram_inputs(a, gamma, ids, cu_seqlens, seg_pairs), "cuda")
    if seg_pairs.shape[0]:
        # One host sync: the output shape (and the grid) depend on the longest segments.
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        tmax_i = int(lengths[seg_pairs[:, 0]].max())
        tmax_j = int(lengths[seg_pairs[:, 1]].max())
    else:
        tmax_i = tmax_j = 0
    values, pos = torch.ops.entangle_fast.ghost_gram(a, gamma, ids, cu_seqlens, seg_pairs, tmax_i, tmax_j,
                                                     bool(positions))
    return values, (pos if positions else None)


@torch.library.custom_op("entangle_fast::pair_wgrad", mutates_args=("grad_weight", "grad_bias", "stats"),
                         device_types="cuda")
def _pair_wgrad_op(a: Tensor, gamma: Tensor, cu_seqlens: Tensor, pairs: Tensor, fold: Tensor, unpaired: Tensor,
                   grad_weight: Tensor, grad_bias: Optional[Tensor], stats: Tensor) -> None:
    load_extension().pair_wgrad(a, gamma, cu_seqlens, pairs, fold, unpaired, grad_weight, grad_bias, stats)


@_pair_wgrad_op.register_fake
def _pair_wgrad_fake(a, gamma, cu_seqlens, pairs, fold, unpaired, grad_weight, grad_bias, stats):
    return None


def cuda_pair_wgrad(a, gamma, cu_seqlens, pairs, fold, unpaired, *, bias: bool, out_dtype):
    """Weight gradient of one layer and per-pair statistics of its per-row gradients (CUDA C++ kernel).

    The contract of ``entangle_fast.kernels.pair_wgrad.pair_wgrad``: a [S, d_in], gamma [S, d_out] in one dtype among
    fp32/bf16/fp16; cu_seqlens int64 [R + 1], pairs int64 [B, 2], fold int32 [B, 2], unpaired int64 [U] already
    validated and planned (entangle_fast.bookkeeping.pair_plan). Returns (grad_weight [d_out, d_in] out_dtype,
    grad_bias [d_out] or None, stats fp32 [3, B] = <G_w, G_l>, ||G_w||^2, ||G_l||^2).
    """
    check_placement(check_pair_wgrad_inputs(a, gamma, cu_seqlens, pairs, fold, unpaired, out_dtype), "cuda")
    d_in, d_out = a.shape[1], gamma.shape[1]
    # The kernel writes float32 or the inputs' dtype; any other out_dtype goes through a float32 buffer.
    buf_dtype = out_dtype if out_dtype in (torch.float32, gamma.dtype) else torch.float32
    # NaN-filled rather than empty: an element the kernel failed to write cannot pass as a value. The statistics are
    # accumulated with atomics, so they start at 0.
    gw = torch.full((d_out, d_in), float("nan"), dtype=buf_dtype, device=gamma.device)
    gb = torch.full((d_out,), float("nan"), dtype=buf_dtype, device=gamma.device) if bias else None
    stats = torch.zeros(3, pairs.shape[0], dtype=torch.float32, device=gamma.device)
    torch.ops.entangle_fast.pair_wgrad(a, gamma, cu_seqlens, pairs, fold, unpaired, gw, gb, stats)
    return gw.to(out_dtype), (gb.to(out_dtype) if gb is not None else None), stats
