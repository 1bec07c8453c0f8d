"""Per-token gradient profiler: the full-model token matrix K[t, s] = <grad l^w_t, grad l^l_s> of preference pairs.

docs/math.md section 3.2: through attention, grad l_t reaches every earlier position, so K needs one backward per
response token. The paper's heat-maps take those backwards one at a time with ``retain_graph`` and flatten every
parameter's gradient (:func:`per_token_matrix_baseline`, kept here as the benchmark baseline). This module takes them
batched and never forms a parameter-sized vector:

1. One no-grad forward of the pair keeps every covered module's input a (per row) and the final hidden states h_t at
   the response tokens; one fused log-prob call gives the seeds r_t = d l_t / d h_t = W^T (e_{y_t} - p_t) and the
   exact output-layer statistics (:func:`entangle_fast.output_layer_token_stats`) come from the same h.
2. Per response, the tokens are cut into chunks. A chunk runs the backbone on the prefix its tokens need (a causal
   LM's activations at positions <= p do not depend on later ones) under ``torch.func.vjp``, with a zero perturbation
   added to each covered module's output and the norms' parameters as inputs, then pulls back the seeds of all its
   tokens at once (``torch.func.vmap``). That gives per token t, at every module, gamma^(t)_tau = d l_t / d y_tau
   ``[tokens, positions, d_out]``, and each norm's per-token parameter gradient directly. SDPA runs its math path
   there: its fused kernels have no batching rule, so vmap would fall back to a loop over tokens.
3. The layer identities of docs/math.md section 4 give each module's share of K per token pair:

   - linear / Conv1D weight (+ bias), "ghost": K[t, s] = sum_{tau, sigma} M[tau, sigma] (gamma^(t)_tau .
     gamma^(s)_sigma), M = a^w a^l^T (+ 1 with a bias). Each kept rejected chunk is folded once with the chosen
     row's M (H^(s) = M gamma^(s), ``[T_l, P_w, d_out]``); each chosen chunk is then one Gram with it. About
     T_l P_w P_l d + T_w T_l P d per layer: T^3 d, never T^4, and no [d_out, d_in] matrix;
   - the same map, "explicit" per-token gradients sum_tau gamma^(t)_tau a_tau^T and their Gram, when cheaper
     (small d_in, e.g. LoRA's B);
   - embeddings: the ghost form with M[tau, sigma] = [x_tau == x'_sigma];
   - norms (and classes given to ``register_positionwise``): the per-token parameter gradients of step 2, and
     their Gram;
   - the output embedding: the fused output-layer statistics of step 1;
   - a matrix used twice (tied GPT-2 ``wte``/``lm_head``): both uses plus the cross terms
     sum_tau delta'_s[x_tau] (gamma^(t)_tau . h'_s) and its mirror.

   Rejected-side factors are kept in blocks that fit ``memory_budget`` (a second block runs the chosen side again).
4. ``mode="sketch"`` (long responses): each token's gradient of a matrix parameter is kept only as its Kronecker
   sketch (P_out G P_in^T, ``k x k``, docs/math.md section 5), so memory no longer grows with the layer widths times
   the positions; biases, norms and the output layer stay exact. Sketched shares are unbiased estimates.

:func:`profile_pair` adds the log-probs, the monitor's per-module statistics and position attribution, and the
paper's case; :func:`run_profile` walks a data set and writes the report (:mod:`entangle_fast.report`).

The package, by seam: :mod:`.engine` (the batched per-token engine and :func:`per_token_matrix`), :mod:`.baseline`
(the paper's per-token loop), :mod:`.results` (the returned dataclasses), :mod:`.run` (one pair profiled, and a data
set walked into a report). Data loading and encoding live in :mod:`entangle_fast.data`, model loading in
:mod:`entangle_fast.models`.
"""
from __future__ import annotations

from entangle_fast.data import PAIR_KEYS, decode_tokens, encode_pair, load_pairs, pair_hash
from entangle_fast.models import builtin_model, load_model, resolve_device
from entangle_fast.profile import engine
from entangle_fast.profile.baseline import per_token_matrix_baseline
from entangle_fast.profile.engine import (
    AUTO_SKETCH_TOKENS,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_SKETCH_DIM,
    LINEAR_PATH,
    MAX_CHUNK_TOKENS,
    MODES,
    per_token_matrix,
)
from entangle_fast.profile.results import CASE_NAMES, PairProfile, ProfileRun, TokenMatrix
from entangle_fast.profile.run import profile_pair, run_profile

__all__ = [
    "AUTO_SKETCH_TOKENS", "CASE_NAMES", "DEFAULT_MEMORY_BUDGET", "DEFAULT_SKETCH_DIM", "LINEAR_PATH",
    "MAX_CHUNK_TOKENS", "MODES", "PAIR_KEYS", "PairProfile", "ProfileRun", "TokenMatrix", "builtin_model",
    "decode_tokens", "encode_pair", "engine", "load_model", "load_pairs", "pair_hash", "per_token_matrix",
    "per_token_matrix_baseline", "profile_pair", "resolve_device", "run_profile",
]
