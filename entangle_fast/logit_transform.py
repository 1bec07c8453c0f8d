"""What a causal LM does to its logits after the output head, before the softmax.

The fused log-prob op computes ``log_softmax(z)[label]`` with ``z = f(l)``, ``l = h W^T + b`` the head's output and
``f`` applied elementwise:

    z = scale * l                                  (softcap None: Granite divides by ``logits_scaling``, Cohere
                                                    multiplies by ``logit_scale``)
    z = softcap * tanh(scale * l / softcap)        (Gemma 2/3 ``final_logit_softcapping``)

Gradients go through ``dz/dl = f'(l)``: the per-token head gradient is ``(f'(l_t) * (e_y - p_t)) h_t^T`` with ``p_t``
the softmax of ``z_t``, so every statistic of the head (docs/math.md section 3.1) is formed from ``f'(l) * delta``.
With the identity transform ``f'`` is 1 and nothing changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogitTransform:
    """``z = f(l)``: ``scale * l``, then ``softcap * tanh(. / softcap)`` when ``softcap`` is set."""

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and self.scale == self.scale and self.scale not in (0.0,)
                and abs(self.scale) != float("inf")):
            raise ValueError(f"logit scale must be a finite nonzero number, got {self.scale!r}")
        if self.softcap is not None and not (isinstance(self.softcap, (int, float)) and 0 < self.softcap < float("inf")):
            raise ValueError(f"softcap must be a finite positive number or None, got {self.softcap!r}")

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: Tensor) -> Tensor:
        """``z = f(l)`` elementwise, in the dtype of ``logits``."""
        z = logits if self.scale == 1.0 else logits * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def derivative(self, logits: Tensor) -> Tensor:
        """``dz/dl`` elementwise at ``l = logits``."""
        if self.softcap is None:
            return torch.full_like(logits, self.scale)
        t = torch.tanh(logits * (self.scale / self.softcap))
        return (1 - t * t) * self.scale

    def describe(self) -> str:
        parts = [] if self.scale == 1.0 else [f"scale={self.scale:g}"]
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        return ", ".join(parts) or "identity"


IDENTITY = LogitTransform()
