"""What the profiler returns: the token matrix of one pair, the profile of one pair, and a data-set run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor


@dataclass
class TokenMatrix:
    """The full-model token matrix of one preference pair over the tracked parameters.

    Attributes:
        matrix: ``[T_w, T_l]`` K[t, s] = <grad l^w_t, grad l^l_s>, tokens in position order (log-prob units).
        per_module: module name -> ``[]`` total of that module's share of K (sum over t, s); it equals the module's
            sentence-level inner product <grad_m s_w, grad_m s_l>. A shared matrix adds ``"<x> x <y>"`` for its
            cross terms. The values sum to ``matrix.sum()``.
        module_matrices: module name -> ``[T_w, T_l]`` share of K, when asked for (``module_matrices=True``).
        chosen_positions / rejected_positions: ``[T_w]`` / ``[T_l]`` int64 positions (in the batch rows) whose
            hidden state scores each response token (the token itself sits at position + 1).
        mode: ``"exact"`` or ``"sketch"``. sketched: the modules whose shares are sketch estimates.
        paths: module name -> how its share was computed (``ghost``, ``explicit``, ``vector``, ``sketch``, ``head``,
            ``cross``).
        output_layer: :meth:`entangle_fast.OutputLayerTokenStats.pair` of this pair (None without a tracked head).
        token_backwards: loss tokens back-propagated (T_w + T_l, more when a block had to be recomputed).
        batched_backwards: batched backward calls.
    """

    matrix: Tensor
    per_module: dict[str, Tensor]
    chosen_positions: Tensor
    rejected_positions: Tensor
    mode: str
    sketched: tuple[str, ...] = ()
    paths: dict[str, str] = field(default_factory=dict)
    module_matrices: dict[str, Tensor] | None = None
    output_layer: dict[str, Tensor] | None = None
    token_backwards: int = 0
    batched_backwards: int = 0


CASE_NAMES = {0: "undefined", 1: "ideal: chosen rises, rejected falls", 2: "both fall", 3: "both rise"}


@dataclass
class PairProfile:
    """Everything the profiler reports about one pair (log-prob units throughout).

    Attributes:
        token: :class:`TokenMatrix` (full model; its ``output_layer`` is the exact output-layer statistics).
        chosen_token_logps / rejected_token_logps: ``[T_w]`` / ``[T_l]`` response-token log-probs.
        chosen_logp / rejected_logp: ``[]`` sequence log-probs s_w, s_l.
        inner, chosen_sq_norm, rejected_sq_norm, cosine: ``[]`` I, N_w, N_l, cos of the whole tracked set, from one
            monitored backward (exact, whatever ``token.mode``).
        case: the paper's case for a DPO-like loss (a_w = -a_l): 1 ideal, 2 both fall, 3 both rise, 0 undefined.
        chosen_falls / rejected_rises: first-order SGD outcome (I > N_w, I > N_l).
        per_module: module name -> ``(inner, chosen_sq_norm, rejected_sq_norm)`` (the monitor's).
        position_attribution: ``[P_w, P_l]`` the monitor's split of I over the positions where layers act (every
            position of the two rows, prompt included; not K). chosen_input_ids / rejected_input_ids: ``[P_w]`` /
            ``[P_l]`` the rows' input ids (its axes).
        chosen_ids / rejected_ids: ``[T_w]`` / ``[T_l]`` response token ids (K's axes).
    """

    token: TokenMatrix
    chosen_token_logps: Tensor
    rejected_token_logps: Tensor
    chosen_logp: Tensor
    rejected_logp: Tensor
    inner: Tensor
    chosen_sq_norm: Tensor
    rejected_sq_norm: Tensor
    cosine: Tensor
    case: int
    chosen_falls: bool
    rejected_rises: bool
    per_module: dict[str, tuple[Tensor, Tensor, Tensor]]
    position_attribution: Tensor
    chosen_input_ids: Tensor
    rejected_input_ids: Tensor
    chosen_ids: Tensor
    rejected_ids: Tensor


@dataclass
class ProfileRun:
    """What :func:`run_profile` did: ``records`` (every finished pair, this run's and resumed ones, by index),
    ``computed`` / ``skipped`` pair indices, and the files."""

    out_dir: Path
    records_path: Path
    html_path: Path | None
    records: list[dict]
    computed: list[int]
    skipped: list[int]
