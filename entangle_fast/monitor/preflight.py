"""Checks the monitor makes before it measures: a model with something to track, and whether dropout is active.

- :func:`check_model`: at construction, once the tracked parameter set is resolved. A model with no trainable
  parameter (frozen, or a module without parameters) or a tracked set left empty by ``params``/``exclude`` would
  otherwise give all-zero statistics that look like a measurement.
- :func:`warn_if_dropout`: on entering the ``with`` block. Dropout changes what the statistics are about (below), so
  the monitor says so, once per model.

What the statistics mean under active dropout: every forward draws a fresh dropout mask, so the step's gradients, and
the monitor's inner products and norms computed exactly from them, are those of *that step's masked network*. They are
exact for the gradient the optimizer applies, but they are one random draw of it, not the statistics of the
deterministic model that evaluation (or a reference model in ``eval()``/``no_grad``) scores. ``predicted_delta`` then
forecasts the change of the masked log-probs under the same mask; the next step draws another mask, and an eval-mode
measurement sees neither, so predicted and measured changes agree less, and a pair's case can change from one draw to
the next. For statistics of the deterministic model, monitor the step with dropout off (``model.eval()``, or dropout
probabilities 0 in the config; TRL's ``DPOConfig(disable_dropout=True)``, its default, does this).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Iterable

from torch import nn

# Config fields through which Hugging Face models apply dropout functionally (no nn.Dropout module to find), e.g.
# Llama's attention_dropout, passed to scaled_dot_product_attention while the model is in training mode.
DROPOUT_CONFIG_FIELDS = (
    "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "resid_pdrop", "residual_dropout",
    "hidden_dropout", "hidden_dropout_prob", "embd_pdrop", "embedding_dropout", "dropout",
)

_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class ActiveDropoutWarning(UserWarning):
    """A monitored model is in training mode with dropout active: the statistics are those of one dropout draw."""


def check_model(model: nn.Module, tracked_params: Iterable) -> None:
    """Raise a ``ValueError`` naming the model's class when there is nothing to measure.

    Args:
        model: the monitored model.
        tracked_params: the resolved parameter set the monitor will track (after ``params`` and ``exclude``).

    Raises:
        ValueError: the model has no parameter with ``requires_grad`` (frozen, or none at all), or it has some but
            the tracked set is empty.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"EntanglementMonitor expects an nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if not any(p.requires_grad for p in model.parameters()):
        total = sum(1 for _ in model.parameters())
        what = "has no parameters" if total == 0 else f"has {total} parameters, none with requires_grad=True (frozen)"
        raise ValueError(f"{name} {what}: the monitor measures gradients of trainable parameters, so there is nothing "
                         "to measure. Unfreeze the parameters to train (or the adapter, for PEFT) before monitoring.")
    if not list(tracked_params):
        raise ValueError(f"no parameter of {name} is tracked: params= and exclude= leave the tracked set empty, so "
                         "every statistic would be zero. Track at least one trainable parameter.")


def dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Dropout``-family module of ``model``."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.modules.dropout._DropoutNd)]


def active_dropout(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Where dropout is active in ``model``: names of ``nn.Dropout``-family modules in training mode with p > 0, and
    ``config.<field>=<p>`` for config dropout probabilities > 0 while the model is in training mode. ``modules``:
    :func:`dropout_modules` of the model, when the caller keeps them (default: found now)."""
    modules = dropout_modules(model) if modules is None else modules
    found = [f"{name or type(module).__name__} (p={module.p:g})" for name, module in modules
             if module.training and module.p > 0]
    config = getattr(model, "config", None)
    if model.training and config is not None:
        # The config's own attributes, and its aliases (a transformers config's attribute_map) by getattr: a missing
        # field costs a failed lookup through the config's __getattr__ otherwise, at every monitored step.
        own, aliases = getattr(config, "__dict__", {}), getattr(config, "attribute_map", None) or {}
        cls = type(config)
        for field in DROPOUT_CONFIG_FIELDS:
            by_getattr = field in aliases or hasattr(cls, field)  # an alias, or a class attribute or property
            value = getattr(config, field, None) if by_getattr else own.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                found.append(f"config.{field}={value:g}")
    return found


def warn_if_dropout(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None) -> bool:
    """Warn (:class:`ActiveDropoutWarning`) once per model when it is in training mode with active dropout
    (``modules``: as in :func:`active_dropout`).

    Returns True when this call warned. The model is remembered weakly, so the warning does not keep it alive.
    """
    if not model.training or model in _warned:
        return False
    where = active_dropout(model, modules)
    if not where:
        return False
    _warned.add(model)
    shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
    warnings.warn(
        f"{type(model).__name__} is in training mode with active dropout ({shown}): the entanglement statistics are "
        "exact for this step's dropout mask, a random draw, not for the deterministic model evaluation scores, and "
        "predicted_delta forecasts the change under that same mask. Call model.eval() (or set the dropout "
        "probabilities to 0) for statistics of the deterministic model. Warned once per model; see "
        "entangle_fast/monitor/preflight.py and docs/integrations.md.",
        ActiveDropoutWarning, stacklevel=3,
    )
    return True
