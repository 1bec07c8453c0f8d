"""TRL integration: :class:`EntangledDPOTrainer`, a ``trl.DPOTrainer`` whose log-probs come from the fused op and whose
steps run under the entanglement monitor; :func:`patch_trl` makes existing scripts' ``trl.DPOTrainer`` this class.

Supported TRL: ``>=0.29, <2`` (:data:`TRL_MIN`, :data:`TRL_MAX`), checked at import. From 0.29 on, TRL's preference
collator emits ``input_ids``/``attention_mask``/``completion_mask`` rows (chosen first) and ``DPOTrainer`` computes its
loss in ``_compute_loss(model, inputs, return_outputs)``, the one method overridden here; tested on TRL 1.16.0.
``ENTANGLE_FAST_SKIP_TRL_VERSION_CHECK=1`` skips the check (at your own risk).

What changes against stock TRL, on the configurations this class computes itself (every ``loss_type`` of TRL's
DPOTrainer, :data:`SUPPORTED_LOSS_TYPES`, alone or weighted together with ``loss_weights``; reverse-KL scores; no
``ld_alpha``, WPO weighting, MoE auxiliary loss, vision inputs, prompt-learning PEFT, Liger loss):

- policy and reference log-probs come from :func:`entangle_fast.preference_logprobs` (one backbone forward, the fused
  log-prob op; no ``[2B, T, V]`` tensor), each loss from its registration in :mod:`entangle_fast.losses` with the
  DPOConfig fields TRL reads for it (batch losses ``aot``, ``aot_unpaired`` and ``sft`` as TRL forms them);
- the loss, its gradients and TRL's ``rewards/*``, ``logps/*`` and ``num_tokens`` logs are TRL's; ``entropy``,
  ``logits/chosen``, ``logits/rejected`` and ``mean_token_accuracy`` are TRL's reductions of per-token metrics the fused
  op streams (:func:`token_metric_means`), logged where the installed fused op offers ``token_metrics``;
- every ``entangle_every``-th optimizer step runs under :class:`~entangle_fast.monitor.EntanglementMonitor`; its
  ``entangle/`` means, with ``entangle/ches`` and ``entangle/ches_norm`` (:mod:`entangle_fast.ches`), go through TRL's
  own metric path (console, TensorBoard, W&B, ``state.log_history``).

Any other configuration falls back to TRL's own ``_compute_loss``, with a warning, and no monitoring.

:func:`patch_trl` also routes TRL's own fused LM head (``add_fused_lm_head``, the chunked log-prob function TRL uses
for DPO/KTO/GRPO/RLOO/SFT since 1.14) through :func:`entangle_fast.linear_logprobs` where the installed TRL has it.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings

try:
    import trl
    from trl.trainer.dpo_trainer import DPOTrainer as _StockDPOTrainer
except ImportError as _err:  # pragma: no cover - exercised with TRL hidden
    raise ImportError(
        "entangle_fast.integrations.trl needs TRL (with peft and accelerate): pip install entangle-fast[trl]"
    ) from _err

import torch
from packaging.version import Version

from entangle_fast.integrations.distributed import unwrap_model, wrapped_preference_logprobs
from entangle_fast.integrations.hf import StepMonitor
from entangle_fast.logprobs import linear_logprobs
from entangle_fast.losses import LOSSES, TRL_LOSS_TYPES, preference_loss
from entangle_fast.preference import logit_transform, output_head, preference_logprobs

__all__ = ["EntangledDPOTrainer", "patch_trl", "unpatch_trl", "token_metric_means", "SUPPORTED_LOSS_TYPES",
           "TRL_MIN", "TRL_MAX"]

logger = logging.getLogger(__name__)

TRL_MIN, TRL_MAX = "0.29.0", "2.0.0"


def _check_trl_version(version: str) -> None:
    if os.environ.get("ENTANGLE_FAST_SKIP_TRL_VERSION_CHECK") == "1":
        return
    v = Version(version)
    if not Version(TRL_MIN) <= v < Version(TRL_MAX):
        raise ImportError(
            f"entangle_fast.integrations.trl supports trl>={TRL_MIN},<{TRL_MAX}; found trl {version}. "
            "Install a supported release: pip install entangle-fast[trl] "
            "(or set ENTANGLE_FAST_SKIP_TRL_VERSION_CHECK=1 to try anyway)"
        )


_check_trl_version(trl.__version__)

# TRL loss_type -> entangle_fast.losses name: every loss type of TRL 1.16's DPOTrainer, in TRL's exact form.
SUPPORTED_LOSS_TYPES = dict(TRL_LOSS_TYPES)

# Whether the installed fused op streams the per-token metrics behind TRL's entropy, logits/* and mean_token_accuracy.
HAS_TOKEN_METRICS = "token_metrics" in inspect.signature(linear_logprobs).parameters and (
    "token_metrics" in inspect.signature(preference_logprobs).parameters)


def token_metric_means(metrics, labels, vocab_size: int) -> dict:
    """This rank's sums behind TRL's ``entropy``, ``logits/chosen``, ``logits/rejected`` and ``mean_token_accuracy``.

    Args:
        metrics: per-token ``entropy``, ``logit_sum`` (sum of the logits over the vocabulary) and ``argmax``, each
            ``[2B, T]`` like ``labels`` (:class:`entangle_fast.logprobs.TokenMetrics`).
        labels: ``[2B, T]`` shifted labels, -100 off the response tokens; rows chosen first, then rejected.
        vocab_size: V (mean logit = logit_sum / V).

    Returns:
        ``{name: (sum, count)}`` 0-d tensors, to be summed across ranks and divided as TRL does (0 when count is 0):
        entropy over every response token; mean logits over the chosen / rejected response tokens; accuracy (the
        label is the first argmax) over the chosen response tokens.
    """
    mask = labels != -100
    b = labels.shape[0] // 2
    mask_w, mask_l = mask[:b], mask[b:]
    mean_logits = metrics.logit_sum.float() / vocab_size
    top1 = (metrics.argmax == labels)[:b] & mask_w
    return {
        "entropy": ((metrics.entropy.float() * mask).sum(), mask.sum()),
        "logits/chosen": (mean_logits[:b][mask_w].sum(), mask_w.sum()),
        "logits/rejected": (mean_logits[b:][mask_l].sum(), mask_l.sum()),
        "mean_token_accuracy": (top1.sum(), mask_w.sum()),
    }


def _value(x):
    return getattr(x, "value", x)  # older TRL releases hold some options as enums


class EntangledDPOTrainer(_StockDPOTrainer):
    """``trl.DPOTrainer`` with fused log-probs and the entanglement monitor (module docstring).

    Args (beyond ``trl.DPOTrainer``'s, all keyword-only):
        entangle_every: monitor every n-th optimizer step (1: every step; 0: never).
        entangle_mode: ``"exact"`` or ``"sketch"`` (:class:`~entangle_fast.monitor.EntanglementMonitor`).
        entangle_params: tracked parameters (default: every trainable one, LoRA adapters included).
        entangle_monitor_kwargs: further monitor arguments (``exclude``, ``sketch_dim``, ``seed``).
        entangle_images_every: token heat-maps every n-th step, main process only, when TensorBoard or W&B is
            configured (0: never).
        entangle_impl: backend of the fused log-prob op (``"auto"``, ``"triton"``, ``"torch"``).

    Defaults come from :attr:`entangle_defaults` (what :func:`patch_trl` sets for scripts that cannot pass them).
    """

    entangle_defaults: dict = {"entangle_every": 1, "entangle_mode": "exact", "entangle_params": None,
                               "entangle_monitor_kwargs": None, "entangle_images_every": 100, "entangle_impl": "auto"}

    def __init__(self, *args, **kwargs):
        options = dict(self.entangle_defaults)
        for key in list(kwargs):
            if key.startswith("entangle_"):
                if key not in options:
                    raise TypeError(f"unknown option {key!r}; EntangledDPOTrainer takes {sorted(options)}")
                options[key] = kwargs.pop(key)
        super().__init__(*args, **kwargs)
        self.entangle = StepMonitor(every=options["entangle_every"], mode=options["entangle_mode"],
                                    params=options["entangle_params"],
                                    monitor_kwargs=options["entangle_monitor_kwargs"],
                                    images_every=options["entangle_images_every"])
        self.entangle_impl = options["entangle_impl"]
        self._entangle_due = False  # whether the step in progress is monitored (CHES is logged with it)
        self.entangle_fallback = self._unsupported()
        if self.entangle_fallback:
            warnings.warn(f"EntangledDPOTrainer: {self.entangle_fallback}; using TRL's own loss computation, without "
                          "entanglement monitoring", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------------------------------------

    def _unsupported(self) -> str | None:
        """Why this configuration is not computed here (None when it is)."""
        unknown = [t for t in self.loss_types if t not in SUPPORTED_LOSS_TYPES]
        if unknown:
            return f"loss_type {unknown} (supported: {sorted(SUPPORTED_LOSS_TYPES)})"
        if _value(self.f_divergence_type) != "reverse_kl":
            return f"f_divergence_type={_value(self.f_divergence_type)!r} (supported: 'reverse_kl')"
        checks = {
            "ld_alpha": self.ld_alpha is not None,
            "use_weighting": bool(getattr(self, "use_weighting", False)),
            "MoE auxiliary loss": bool(getattr(self, "aux_loss_enabled", False)),
            "vision inputs": bool(getattr(self, "_is_vision_dataset", False) or getattr(self, "_is_vlm", False)),
            # Releases up to 1.9 route compute_loss to Liger's fused DPO loss, past the method overridden here.
            "Liger DPO loss": bool(getattr(self, "use_liger_kernel", False) and hasattr(self, "_compute_loss_liger")),
            "padding_free": bool(getattr(self, "padding_free", False)),
        }
        on = [name for name, flag in checks.items() if flag]
        if on:
            return f"{', '.join(on)} not supported"
        peft_config = getattr(self.model, "peft_config", None)
        if isinstance(peft_config, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
            return "prompt-learning PEFT (virtual tokens) not supported"
        try:
            output_head(unwrap_model(self.model))
            logit_transform(unwrap_model(self.model))
        except (NotImplementedError, ValueError) as err:
            return str(err)
        return None

    def training_step(self, model, *args, **kwargs):
        if self.entangle_fallback:
            return super().training_step(model, *args, **kwargs)
        stock_step = super().training_step
        self._entangle_due = self.entangle.due(self.state.global_step)
        try:
            return self.entangle.run(self, model, lambda: stock_step(model, *args, **kwargs), self._entangle_metrics)
        finally:
            self._entangle_due = False

    def _entangle_metrics(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)

    def _reference_logps(self, batch: dict):
        """``(ref_chosen, ref_rejected)`` ``[B]`` from the reference model (or the policy with its adapter off)."""
        from trl.models.utils import disable_gradient_checkpointing

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
            stack.enter_context(self.accelerator.autocast())
            ref = self.ref_model
            peft_model = _unwrap_peft(self.model)
            if ref is None and hasattr(peft_model, "peft_config"):
                from trl.trainer.utils import use_adapter

                stack.enter_context(use_adapter(peft_model, "ref" if "ref" in peft_model.peft_config else None))
                ref = self.model
            out = wrapped_preference_logprobs(ref, batch, impl=self.entangle_impl)
        return out.chosen_logps.detach(), out.rejected_logps.detach()

    def _compute_loss(self, model, inputs, return_outputs):
        if self.entangle_fallback:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask, completion_mask = inputs["input_ids"], inputs["attention_mask"], inputs[
            "completion_mask"]
        if hasattr(self, "_truncate_inputs"):  # TRL 0.29 truncates here; later releases in the collator
            input_ids, attention_mask, completion_mask = self._truncate_inputs(input_ids, attention_mask,
                                                                               completion_mask)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        batch, inputs = self._drop_empty_pairs(batch, inputs, mode)
        if batch is None:  # every pair of the batch had an empty response
            zero = torch.zeros((), device=input_ids.device, requires_grad=True)
            return (zero, None) if return_outputs else zero
        input_ids, attention_mask, completion_mask = batch["input_ids"], batch["attention_mask"], batch[
            "completion_mask"]

        options = {"ches": self._entangle_due and mode == "train"}
        if HAS_TOKEN_METRICS:
            options["token_metrics"] = True
        with self.accelerator.autocast():
            out = wrapped_preference_logprobs(model, batch, impl=self.entangle_impl, **options)
        chosen_logps, rejected_logps = out.chosen_logps, out.rejected_logps
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._reference_logps(batch)
        ref_chosen = ref_chosen.to(chosen_logps)
        ref_rejected = ref_rejected.to(rejected_logps)
        # TRL's ipo and sigmoid_norm average over the (unshifted) completion mask's count, at least one; its sft over
        # the scored (shifted) completion tokens.
        lengths = {"completion": completion_mask.sum(dim=1).clamp(min=1).to(chosen_logps.dtype).chunk(2, dim=0),
                   "scored": (out.chosen_lengths, out.rejected_lengths)}

        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            spec = LOSSES[SUPPORTED_LOSS_TYPES[loss_type]]
            chosen_lengths, rejected_lengths = lengths["scored" if spec.name == "sft" else "completion"]
            per_pair = preference_loss(
                spec.name, chosen_logps, rejected_logps, ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                **{k: self._trl_hyper(k) for k in spec.trl_hyper},
            ).losses
            loss = loss + per_pair.mean() * weight

        if out.ches is not None:
            for key, value in (("ches", out.ches), ("ches_norm", out.ches_norm)):
                value = self.accelerator.gather(value.detach().float())
                value = value[value.isfinite()]
                if value.numel():
                    self._metrics[mode][f"{self.entangle.prefix}{key}"].append(value.mean().item())
        token_metrics = getattr(out, "token_metrics", None)
        if token_metrics is not None:
            labels = batch_labels(input_ids, attention_mask, completion_mask)
            vocab = output_head(unwrap_model(model))[0].shape[0]
            for key, (total, count) in token_metric_means(token_metrics, labels, vocab).items():
                total = self.accelerator.gather_for_metrics(total.detach()).sum().item()
                count = self.accelerator.gather_for_metrics(count).sum().item()
                self._metrics[mode][key].append(total / count if count > 0 else 0.0)
        self._log_trl_metrics(mode, attention_mask, chosen_logps, rejected_logps, ref_chosen, ref_rejected)
        if return_outputs:
            with torch.no_grad():
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return loss, outputs
        return loss

    def _drop_empty_pairs(self, batch: dict, inputs: dict, mode: str):
        """Pairs whose chosen or rejected response has no scored token (truncation can remove a whole response) would
        train on an empty sum and give NaN statistics: they are left out of the step, counted in
        ``entangle/skipped_empty_pairs`` (the running total), and named once in a warning. Returns the kept
        ``(batch, inputs)``, or ``(None, inputs)`` when no pair is left."""
        labels = batch_labels(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        b = labels.shape[0] // 2
        empty = (labels == -100).all(-1)
        empty = empty[:b] | empty[b:]
        if not bool(empty.any()):
            return batch, inputs
        self._entangle_skipped = getattr(self, "_entangle_skipped", 0) + int(empty.sum())
        self._metrics[mode][f"{self.entangle.prefix}skipped_empty_pairs"].append(float(self._entangle_skipped))
        if not getattr(self, "_entangle_warned_empty", False):
            self._entangle_warned_empty = True
            warnings.warn(f"pairs {torch.nonzero(empty).flatten().tolist()} of a batch of {b} have an empty chosen or "
                          "rejected response (every label masked, e.g. by truncation): they are left out of the step "
                          "and counted in entangle/skipped_empty_pairs (warned once)", stacklevel=3)
        keep = torch.nonzero(~empty).flatten()
        if keep.numel() == 0:
            return None, inputs
        rows = torch.cat([keep, keep + b])
        batch = {k: v[rows] for k, v in batch.items()}
        inputs = dict(inputs)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in inputs:
                inputs[key] = inputs[key][keep.to(inputs[key].device)]
        return batch, inputs

    def _trl_hyper(self, name: str):
        """The value TRL's loss code reads for DPOConfig field ``name`` (the trainer's copy where TRL keeps one)."""
        return getattr(self, name) if hasattr(self, name) else getattr(self.args, name)

    def _log_trl_metrics(self, mode, attention_mask, chosen_logps, rejected_logps, ref_chosen, ref_rejected) -> None:
        """TRL's ``rewards/*``, ``logps/*`` and ``num_tokens`` entries, gathered across ranks as TRL gathers them."""
        acc, metrics = self.accelerator, self._metrics[mode]
        if mode == "train":
            tokens = acc.gather_for_metrics(attention_mask.sum()).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_rewards = self.beta * (chosen_logps - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected).detach()
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())


def batch_labels(input_ids, attention_mask, completion_mask):
    """The ``[2B, T-1]`` shifted labels the fused op scores (-100 off the response tokens)."""
    keep = completion_mask.bool() & attention_mask.bool()
    return input_ids.masked_fill(~keep, -100)[:, 1:]


def _unwrap_peft(model):
    """The PEFT model inside DDP-like wrappers (or the model itself)."""
    while not hasattr(model, "peft_config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Patching existing scripts

_PATCH_SITES = ("trl", "trl.trainer", "trl.trainer.dpo_trainer")
_saved: dict[str, object] = {}

# TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, TRL >= 1.14) calls this module attribute for the per-token
# log-probs of the backbone's hidden states; DPO, KTO, GRPO, RLOO and SFT all go through it.
SEAM_MODULE, SEAM_NAME = "trl.trainer.utils", "_ChunkedLogProbFunction"
_TOKEN_OUTPUTS = {"entropy", "mean_logits", "is_top1"}


class FusedLogProbSeam:
    """Stands in for TRL's ``ChunkedLogProbFunction`` at TRL's seam: the same ``apply`` arguments
    (``hidden [N, d], weight [V, d], bias, targets [N], temperature, chunk_size, final_logit_softcapping, logit_scale,
    outputs``) and the same five outputs (log-probs, entropy, log-sum-of-squared-probs, mean logits, is-top-1), computed
    by :func:`entangle_fast.linear_logprobs`.

    Calls this op cannot serve exactly are passed to TRL's own function (:attr:`original`): a logit transform
    (temperature, soft-cap, scale) or per-token metrics when the installed op lacks ``transform``/``token_metrics``;
    ``log_sum_sq_probs`` (WPO); hidden states and head in different dtypes (autocast). The entropy is returned
    without gradient (TRL 1.16's trainers use it for logging and entropy masks only).
    """

    original = None  # TRL's ChunkedLogProbFunction, set by patch_trl
    calls = 0  # calls served by the fused op (the others went to TRL's function)

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature=1.0, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        extra = set(outputs) - {"log_probs"}
        params = inspect.signature(linear_logprobs).parameters
        identity = temperature == 1 and final_logit_softcapping is None and logit_scale == 1
        servable = (
            (identity or "transform" in params)
            and extra <= _TOKEN_OUTPUTS
            and (not extra or "token_metrics" in params)
            and hidden.dtype == weight.dtype
        )
        if not servable:
            return cls.original.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                      logit_scale, outputs)
        kwargs = {}
        if not identity:
            from entangle_fast.logit_transform import LogitTransform

            cap = None if final_logit_softcapping is None else final_logit_softcapping / temperature
            kwargs["transform"] = LogitTransform(scale=logit_scale / temperature, softcap=cap)
        if extra:
            kwargs["token_metrics"] = True
        result = linear_logprobs(hidden, weight, targets, bias=bias, **kwargs)
        cls.calls += 1
        if not extra:
            return result, None, None, None, None
        log_probs, metrics = result[0], result[-1]
        vocab = weight.shape[0]
        entropy = metrics.entropy.detach() if "entropy" in extra else None
        mean_logits = (metrics.logit_sum / vocab).detach() if "mean_logits" in extra else None
        is_top1 = (metrics.argmax == targets) if "is_top1" in extra else None
        return log_probs, entropy, None, mean_logits, is_top1


def _patch_seam() -> bool:
    """Install :class:`FusedLogProbSeam` at TRL's chunked log-prob seam; False (one info line) where TRL has none."""
    import importlib

    try:
        module = importlib.import_module(SEAM_MODULE)
    except ImportError:
        module = None
    original = getattr(module, SEAM_NAME, None) if module is not None else None
    if original is None or not callable(getattr(original, "apply", None)):
        logger.info("patch_trl: trl %s has no chunked log-prob seam (%s.%s); TRL's log-prob heads are left as they are",
                    trl.__version__, SEAM_MODULE, SEAM_NAME)
        return False
    if original is not FusedLogProbSeam:
        _saved.setdefault(f"{SEAM_MODULE}:{SEAM_NAME}", original)
        FusedLogProbSeam.original = original
        setattr(module, SEAM_NAME, FusedLogProbSeam)
    return True


def patch_trl(**entangle_defaults) -> type:
    """Make ``trl.DPOTrainer`` (and ``trl.trainer.DPOTrainer``, ``trl.trainer.dpo_trainer.DPOTrainer``) refer to
    :class:`EntangledDPOTrainer`, so an existing script gets fused log-probs and monitoring unchanged.

    Call it before the script runs ``from trl import DPOTrainer`` (a name imported earlier keeps the stock class).
    ``entangle_defaults`` (``entangle_every=10``, ...) become the defaults of the patched class. Idempotent; undone by
    :func:`unpatch_trl`. Returns the class now installed.

    Where the installed TRL has its chunked log-prob seam (TRL >= 1.14, :data:`SEAM_MODULE`), TRL's fused LM head is
    routed through :class:`FusedLogProbSeam` too, so TRL's other trainers (KTO, GRPO, RLOO, SFT) and the reference
    model's head use this library's op; elsewhere that part is skipped with one info log line.
    """
    import importlib

    cls = EntangledDPOTrainer
    if entangle_defaults:
        unknown = sorted(set(entangle_defaults) - set(EntangledDPOTrainer.entangle_defaults))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; patch_trl takes "
                            f"{sorted(EntangledDPOTrainer.entangle_defaults)}")
        cls = type("EntangledDPOTrainer", (EntangledDPOTrainer,), {
            "entangle_defaults": {**EntangledDPOTrainer.entangle_defaults, **entangle_defaults},
            "__module__": __name__,
        })
    for site in _PATCH_SITES:
        module = importlib.import_module(site)
        _saved.setdefault(site, module.__dict__.get("DPOTrainer", _StockDPOTrainer))
        module.DPOTrainer = cls
    _patch_seam()
    return cls


def unpatch_trl() -> None:
    """Undo :func:`patch_trl`: ``trl.DPOTrainer`` is TRL's own class again."""
    import importlib

    for site, original in list(_saved.items()):
        module, _, name = site.partition(":")
        setattr(importlib.import_module(module), name or "DPOTrainer", original)
        del _saved[site]


unpatch = unpatch_trl
