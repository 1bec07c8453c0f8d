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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from entangle_fast.ches import ches_scores
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


def output_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, d], bias [V] | None)`` of a causal LM's output embedding; refuses heads that rescale logits."""
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} transforms its logits ({attr}={value}); the fused log-prob op computes "
                "log_softmax(h W^T + b) only"
            )
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() returned {head})")
    return head.weight, getattr(head, "bias", None)


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

    Returns:
        :class:`PreferenceLogprobs`.

    Raises:
        TypeError: ``model`` is not a Hugging Face causal LM (no ``get_output_embeddings`` / ``base_model``).
        ValueError: a chosen or rejected row has no response token (every label -100); the message names the rows.
    """
    require_causal_lm(model)
    input_ids, attention_mask, labels = normalize_batch(batch)
    check_responses(labels)
    weight, bias = output_head(model)
    hidden = backbone_hidden_states(model, input_ids, attention_mask)
    shifted = labels[:, 1:].contiguous()
    hidden = hidden[:, :-1].to(weight.dtype)
    result = linear_logprobs(hidden, weight, shifted, bias=bias, impl=impl, token_stats=token_stats,
                             full_matrices=full_matrices, token_metrics=token_metrics)
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
