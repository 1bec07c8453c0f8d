"""Chosen and rejected log-probs of a Hugging Face causal LM in one backbone forward, without logits.

Rows follow TRL's concatenated layout: rows 0..B-1 are the chosen responses, rows B..2B-1 the rejected ones, each
row prompt + response. The backbone returns the final hidden states (after the final norm); the fused
:func:`~entangle_fast.linear_logprobs` scores them against the output embedding, so the ``[2B, T, V]`` logits are
never formed.

Accepted batch layouts (``dict`` of tensors):

- ``input_ids``, ``attention_mask`` and ``labels`` ``[2B, T]``: Hugging Face causal-LM labels aligned with
  ``input_ids`` (-100 on prompt and padding); the one-token shift happens here.
- ``input_ids``, ``attention_mask`` and ``completion_mask`` ``[2B, T]``: TRL's concatenated preference batch, as
  produced by TRL's ``DataCollatorForPreference`` since TRL 0.29 (completion tokens marked 1).
- ``prompt_input_ids``/``prompt_attention_mask`` ``[B, P]`` (left-padded) with ``chosen_input_ids``/
  ``chosen_attention_mask`` and ``rejected_input_ids``/``rejected_attention_mask`` (right-padded): the collator keys
  of TRL 0.12 to 0.28; rows are concatenated here.

Left padding is handled by position ids counted from the attention mask, so a left-padded row scores exactly as the
same row unpadded.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from entangle_fast.ches import ches_scores
from entangle_fast.logit_transform import LogitTransform
from entangle_fast.logprobs import TokenMetrics, linear_logprobs
from entangle_fast.token_stats import TokenStatsHandle

IGNORE_INDEX = -100


@dataclass
class PreferenceLogprobs:
    """Log-probs of B preference pairs.

    Attributes:
        chosen_token_logps / rejected_token_logps: ``[B, T-1]`` per-token log-probs of the shifted labels, 0 on prompt
            and padding positions (position t scores token t + 1 of the row).
        chosen_logps / rejected_logps: ``[B]`` sums over response tokens (the sequence log-prob s).
        chosen_mean_logps / rejected_mean_logps: ``[B]`` means over response tokens (never empty: see
            :func:`check_responses`).
        chosen_lengths / rejected_lengths: ``[B]`` int64 response-token counts.
        token_mask: ``[2B, T-1]`` bool, the response tokens (rows in TRL's concatenated order).
        token_stats: with ``token_stats=True``, the handle filled by the backward.
        ches / ches_norm: with ``ches=True``, ``[B]`` detached CHES scores of each pair (:mod:`entangle_fast.ches`).
        token_metrics: with ``token_metrics=True``, the ``[2B, T-1]`` per-token metrics of the fused op.
    """

    chosen_token_logps: Tensor
    rejected_token_logps: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_mean_logps: Tensor
    rejected_mean_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    token_mask: Tensor
    token_stats: TokenStatsHandle | None = None
    ches: Tensor | None = None
    ches_norm: Tensor | None = None
    token_metrics: TokenMetrics | None = None


def collate_rows(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[R, T]`` from token rows.

    ``rows[r]`` is prompt + response token ids, ``labels[r]`` the same length with -100 on the prompt; rows follow
    TRL's concatenated layout when the caller lists the B chosen rows first, then the B rejected ones.
    """
    width = max(len(r) for r in rows)
    return {
        "input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
    }


def _concat_split_batch(batch: dict) -> dict:
    """TRL 0.12-0.28 keys (prompt, chosen, rejected apart) to one ``[2B, P + C]`` batch with labels."""
    p_ids, p_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    rows, masks, labels = [], [], []
    for side in ("chosen", "rejected"):
        c_ids, c_mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        width = max(c_ids.shape[1], 0)
        ids = torch.cat([p_ids, c_ids[:, :width]], dim=1)
        mask = torch.cat([p_mask, c_mask], dim=1)
        lab = torch.cat([torch.full_like(p_ids, IGNORE_INDEX), torch.where(c_mask.bool(), c_ids, IGNORE_INDEX)], 1)
        rows.append(ids), masks.append(mask), labels.append(lab)
    pad = max(r.shape[1] for r in rows)

    def right_pad(t, value):
        return torch.nn.functional.pad(t, (0, pad - t.shape[1]), value=value)

    return {
        "input_ids": torch.cat([right_pad(r, 0) for r in rows]),
        "attention_mask": torch.cat([right_pad(m, 0) for m in masks]),
        "labels": torch.cat([right_pad(lab, IGNORE_INDEX) for lab in labels]),
    }


def normalize_batch(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, labels)`` ``[2B, T]`` from any accepted layout (module docstring)."""
    if "prompt_input_ids" in batch:
        batch = _concat_split_batch(batch)
    if "input_ids" not in batch:
        raise KeyError(
            "batch needs 'input_ids' (with 'labels' or 'completion_mask'), or TRL's 'prompt_input_ids', "
            f"'chosen_input_ids', 'rejected_input_ids' keys; got {sorted(batch)}"
        )
    input_ids = batch["input_ids"]
    if input_ids.ndim != 2 or input_ids.shape[0] % 2:
        raise ValueError(
            f"input_ids must be [2B, T] with chosen rows first, then rejected rows; got {tuple(input_ids.shape)}"
        )
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if "labels" in batch:
        labels = batch["labels"]
    elif "completion_mask" in batch:
        keep = batch["completion_mask"].bool() & mask.bool()
        labels = torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    else:
        raise KeyError("batch needs 'labels' (-100 on prompt and padding) or TRL's 'completion_mask'")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
    return input_ids, mask, labels


def require_causal_lm(model: nn.Module) -> None:
    """Raise a ``TypeError`` naming what is missing when ``model`` is not a Hugging Face causal LM (PEFT-wrapped or
    not): :func:`preference_logprobs` needs its ``get_output_embeddings()`` and its ``base_model`` backbone."""
    missing = [name for name in ("get_output_embeddings", "base_model") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a Hugging Face causal LM (no {' or '.join(missing)}): "
            "preference_logprobs needs a *ForCausalLM model (PEFT-wrapped works); for any other model compute the "
            "chosen and rejected log-probs yourself and call EntanglementMonitor.watch(chosen_logps, rejected_logps)"
        )


def empty_responses(labels: Tensor) -> tuple[list[int], list[int]]:
    """``(chosen, rejected)``: the pair indices whose chosen / rejected row of ``labels`` ``[2B, T]`` (TRL's layout,
    unshifted) has no response token, i.e. no label other than -100 after the first position. One host sync."""
    empty = (labels[:, 1:] == IGNORE_INDEX).all(-1)
    if not bool(empty.any()):
        return [], []
    b = labels.shape[0] // 2
    rows = torch.nonzero(empty).flatten().tolist()
    return [r for r in rows if r < b], [r - b for r in rows if r >= b]


def check_responses(labels: Tensor) -> None:
    """Raise a ``ValueError`` naming every row of ``labels`` ``[2B, T]`` whose response is empty (all labels -100):
    its log-prob would be an empty sum (0) and its statistics NaN, while the loss still trained on it."""
    chosen, rejected = empty_responses(labels)
    if chosen or rejected:
        named = [f"chosen row {i}" for i in chosen] + [f"rejected row {i}" for i in rejected]
        raise ValueError(
            f"empty response (every label is -100) in {', '.join(named)} of {labels.shape[0] // 2} pairs: check the "
            "prompt/response split, the truncation length and the labels; drop such pairs before the step"
        )


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config


# What each causal LM of transformers does to its head's output before the softmax, by model_type prefix:
# (config attribute, how it enters). Checked against the model's own forward by the parity probe on first use.
_LOGIT_RULES = (
    ("granite", "logits_scaling", "divide"),       # Granite, GraniteMoe*, Granite vision/docling text models
    ("minicpm3", "logits_scaling", "divide"),      # divides the hidden states: the same map, the head has no bias
    ("hyperclovax", "logits_scaling", "multiply"),
    ("cohere", "logit_scale", "multiply"),         # Cohere, Cohere2, Cohere2-MoE
)


def logit_transform(model: nn.Module) -> LogitTransform:
    """The map the model applies to ``h W^T + b`` before its softmax: logit scaling and final soft-capping, read from
    its config (:class:`~entangle_fast.logit_transform.LogitTransform`).

    Raises:
        NotImplementedError: the config names a logit scaling this library does not know the direction of.
    """
    config = _text_config(model)
    model_type = str(getattr(config, "model_type", "") or "")
    scale = 1.0
    for prefix, attr, how in _LOGIT_RULES:
        value = getattr(config, attr, None)
        if value in (None, 1, 1.0):
            continue
        if model_type.startswith(prefix):
            scale = 1.0 / float(value) if how == "divide" else float(value)
            break
    else:
        for attr in ("logits_scaling", "logit_scale", "output_multiplier_scale"):
            value = getattr(config, attr, None)
            if value not in (None, 1, 1.0) and isinstance(value, (int, float)):
                raise NotImplementedError(
                    f"{type(model).__name__} (model_type {model_type!r}) sets {attr}={value}, and how it enters the "
                    "logits is not known for this model type; the fused log-prob op would compute other log-probs")
    softcap = None
    for attr in ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"):  # Gemma*, RecurrentGemma, xLSTM
        softcap = softcap or getattr(config, attr, None)
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None)


def output_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, d], bias [V] | None)`` of a causal LM's output embedding."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() returned {head})")
    return head.weight, getattr(head, "bias", None)


class LogitParityError(ValueError):
    """The fused log-probs of a model differ from the ones its own forward gives."""


# Models whose fused log-probs have been checked against their own forward (by identity, held weakly).
_PARITY_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
PARITY_POSITIONS = 32
# |fused - own| <= atol + rtol |own| per token, by the head's dtype; the model's own logits round in that dtype.
PARITY_TOLERANCE = {torch.float64: (1e-7, 1e-7), torch.float32: (2e-3, 2e-3), torch.bfloat16: (0.15, 0.05),
                    torch.float16: (0.05, 0.02)}


def parity_check_enabled() -> bool:
    return os.environ.get("ENTANGLE_FAST_CHECK_PARITY", "1") not in ("0", "false", "False")


@torch.no_grad()
def check_logit_parity(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                       impl: str = "auto", transform: LogitTransform | None = None, own_forward=None) -> float:
    """Compare the fused log-probs of the first row (at most :data:`PARITY_POSITIONS` positions) with the model's own
    forward logits (``log_softmax`` + gather), both in eval mode (no dropout), and raise
    :class:`LogitParityError` on a mismatch. Returns the largest difference. Run once per model by
    :func:`preference_logprobs` (``check_parity=False`` or ``ENTANGLE_FAST_CHECK_PARITY=0`` to skip)."""
    transform = logit_transform(model) if transform is None else transform
    row = slice(0, 1)
    mask = attention_mask[row]
    n = min(int(mask.shape[1]), max(int(mask.long().sum()), 2), PARITY_POSITIONS + 1)
    start = int(torch.nonzero(mask[0]).flatten()[0]) if bool(mask.any()) else 0
    cut = slice(start, min(start + n, mask.shape[1]))
    ids, mask = input_ids[row, cut], mask[:, cut]
    targets = ids[:, 1:]
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        weight, bias = output_head(model)
        hidden = backbone_hidden_states(model, ids, mask)[0, :-1].to(weight.dtype)
        # [n, d], not [1, n, d]: a plain call, outside any monitor's statistics.
        fused = linear_logprobs(hidden, weight, targets[0], bias=bias, impl=impl, transform=transform)[None]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        own = (own_forward or model)(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                     use_cache=False).logits[:, :-1]
    finally:
        for m, mode in training:
            m.training = mode
    own = torch.log_softmax(own.to(fused.dtype), -1).gather(-1, targets[..., None])[..., 0]
    atol, rtol = PARITY_TOLERANCE.get(weight.dtype, (2e-3, 2e-3))
    err = (fused - own).abs()
    worst = int(err.argmax()) if err.numel() else 0
    if err.numel() and bool((err > atol + rtol * own.abs()).any()):
        raise LogitParityError(
            f"{type(model).__name__}: the fused log-probs differ from the model's own forward by up to "
            f"{float(err.max()):.3e} (position {worst}: fused {float(fused.flatten()[worst]):.6f}, model "
            f"{float(own.flatten()[worst]):.6f}) with the logit transform {transform.describe()}. The model transforms "
            "its logits or hidden states in a way this library does not reproduce; its log-probs and statistics "
            "would be wrong. (check_parity=False or ENTANGLE_FAST_CHECK_PARITY=0 skips this check.)")
    return float(err.max()) if err.numel() else 0.0


def backbone_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states ``[R, T, d]`` of the model's backbone (no LM head), positions counted from the mask."""
    base = getattr(model, "get_base_model", None)
    hf_model = base() if callable(base) and hasattr(model, "peft_config") else model
    backbone = hf_model.base_model if hf_model.base_model is not hf_model else None
    if backbone is None:
        raise ValueError(f"{type(hf_model).__name__} is not a causal LM with a separate backbone (base_model)")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def preference_logprobs(
    model: nn.Module,
    batch: dict,
    *,
    impl: str = "auto",
    token_stats: bool = False,
    full_matrices: bool = False,
    ches: bool = False,
    token_metrics: bool = False,
    check_parity: bool = True,
    parity_forward=None,
) -> PreferenceLogprobs:
    """Chosen and rejected log-probs of a Hugging Face causal LM: one backbone forward, no logits.

    Args:
        model: a ``*ForCausalLM`` (PEFT-wrapped works); tied embeddings (GPT-2) are fine.
        batch: ``[2B, T]`` tensors in one of the layouts of the module docstring.
        impl: backend of the fused op (see :func:`~entangle_fast.linear_logprobs`).
        token_stats: compute the output-layer token statistics of each pair (row i with row B + i) in the backward.
        full_matrices: with ``token_stats``, keep the within-response matrices too.
        ches: also return the pairs' CHES scores from the same hidden states (no gradient).
        token_metrics: also return the fused op's per-token entropy, logit sum and argmax (same pass).
        check_parity: on the first batch seen for a model, compare the fused log-probs of a few positions with the
            model's own forward (:func:`check_logit_parity`: one extra forward of one row, once per model); also
            switched off by ``ENTANGLE_FAST_CHECK_PARITY=0``.
        parity_forward: the model's own forward for that probe, where a wrapper has replaced ``model.forward``.

    Returns:
        :class:`PreferenceLogprobs`.

    Raises:
        TypeError: ``model`` is not a Hugging Face causal LM (no ``get_output_embeddings`` / ``base_model``).
        ValueError: a chosen or rejected row has no response token (every label -100); the message names the rows.
        LogitParityError: the parity probe found log-probs other than the model's own.
        NotImplementedError: the model scales its logits in a way this library does not know.
    """
    require_causal_lm(model)
    input_ids, attention_mask, labels = normalize_batch(batch)
    check_responses(labels)
    weight, bias = output_head(model)
    transform = logit_transform(model)
    if check_parity and parity_check_enabled() and model not in _PARITY_CHECKED:
        check_logit_parity(model, input_ids, attention_mask, labels, impl=impl, transform=transform,
                           own_forward=parity_forward)
        _PARITY_CHECKED.add(model)
    hidden = backbone_hidden_states(model, input_ids, attention_mask)
    shifted = labels[:, 1:].contiguous()
    hidden = hidden[:, :-1].to(weight.dtype)
    result = linear_logprobs(hidden, weight, shifted, bias=bias, impl=impl, token_stats=token_stats,
                             full_matrices=full_matrices, token_metrics=token_metrics, transform=transform)
    metrics = result[-1] if token_metrics else None
    if token_metrics:
        result = result[:-1] if token_stats else result[0]
    token_logps, handle = result if token_stats else (result, None)
    mask = shifted != IGNORE_INDEX
    sums = token_logps.sum(-1)
    lengths = mask.sum(-1)
    means = sums / lengths.to(sums.dtype)
    b = input_ids.shape[0] // 2
    ches_pair = ches_scores(hidden, mask) if ches else (None, None)
    return PreferenceLogprobs(
        chosen_token_logps=token_logps[:b],
        rejected_token_logps=token_logps[b:],
        chosen_logps=sums[:b],
        rejected_logps=sums[b:],
        chosen_mean_logps=means[:b],
        rejected_mean_logps=means[b:],
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
        token_mask=mask,
        token_stats=handle,
        ches=ches_pair[0],
        ches_norm=ches_pair[1],
        token_metrics=metrics,
    )
