"""The training integrations on CPU with tiny models built in code: TRL's DPOTrainer, the HF Trainer callback and the
plain-PyTorch example.

Parity with stock TRL follows the tolerance rule: a float64 ground truth (the float64 tiny model's plain logits, log
softmax and response sums, then the loss), stock TRL in float32 and ours in float32; ours may be at most twice as far
from the truth as TRL, plus 16 float32 ulps of the compared quantity's scale (the gradients of the two are summed in
different orders).
"""
from __future__ import annotations

import importlib
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from entangle_fast import preference_logprobs
from entangle_fast.integrations.distributed import METRICS, wrapped_preference_logprobs
from entangle_fast.losses import preference_loss
from entangle_fast.models import BUILTIN_PAIRS, build_tokenizer, encode_pairs, tiny_model
from entangle_fast.reference import sequence_logprobs_reference
from entangle_fast.token_stats import active_listeners
from helpers import assert_close_to_reference

ROOT = Path(__file__).resolve().parents[1]
ENTANGLE_KEYS = {f"entangle/{m}" for m in METRICS}
EPS32 = torch.finfo(torch.float32).eps
# TRL joins prompt and completion without a separator: completions start with a space.
RECORDS = [{"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]} for p in BUILTIN_PAIRS]

requires_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                  reason="requires_trl: pip install entangle-fast[trl]")


OUTDIR: list[str] = []  # the trainers' output_dir (nothing is saved there)


@pytest.fixture(autouse=True, scope="module")
def trainer_environment(tmp_path_factory):
    """A scratch output_dir; one intra-op thread (tiny models run faster on one, and thread pools stall on a busy
    2-core machine)."""
    OUTDIR[:] = [str(tmp_path_factory.mktemp("trainer_out"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hook_state(model: nn.Module) -> dict:
    """Every hook a monitor or a swapped forward could leave on the model, its parameters and the fused op."""
    state = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                    len(m._backward_pre_hooks), id(m.__dict__.get("forward")))
             for name, m in model.named_modules()}
    state.update({f"param {name}": len(p._backward_hooks or {}) for name, p in model.named_parameters()})
    state["stats listeners"] = len(active_listeners())
    return state


def train_and_check_loss(trainer, steps: int) -> list[dict]:
    """Train; the loss is logged at every one of ``steps`` steps and falls. Returns the log history."""
    trainer.train()
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == steps and losses[-1] < losses[0], losses
    return history


def entangle_logs(history: list[dict]) -> list[dict]:
    return [h for h in history if ENTANGLE_KEYS & h.keys()]


# ----------------------------------------------------------------------------------------------------------------------
# TRL


def dpo_trainer(cls, *, loss_type="sigmoid", dtype=torch.float32, steps=1, lr=1e-2, ref_seed=1, model=None,
                peft_config=None, callbacks=None, warn=False, config=None, **kwargs):
    """A DPO trainer of class ``cls`` on the built-in pairs; ``loss_type`` a name or a list; ``config``: more DPOConfig
    fields (``loss_weights``, ``label_smoothing``, ...); DPOConfig fields among ``kwargs`` (``ld_alpha``) go there too."""
    import dataclasses

    from datasets import Dataset
    from trl import DPOConfig

    config = dict(config or {})
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    config.update({k: kwargs.pop(k) for k in list(kwargs) if k in fields})
    args = DPOConfig(output_dir=OUTDIR[0], max_steps=steps, per_device_train_batch_size=3,
                     learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, report_to="none",
                     save_strategy="no", loss_type=[loss_type] if isinstance(loss_type, str) else list(loss_type),
                     beta=0.1, use_cpu=True, bf16=False, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                     gradient_checkpointing=False, **config)
    model = model if model is not None else tiny_model("llama", dtype=dtype)
    ref = None if peft_config is not None else tiny_model("llama", dtype=dtype, seed=ref_seed)
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore")
        return cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(RECORDS),
                   processing_class=build_tokenizer(), peft_config=peft_config, callbacks=callbacks, **kwargs)


def one_step(trainer):
    """Loss, gradients and logged metrics of one compute_loss + backward on the trainer's first batch."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().double() for n, p in trainer.model.named_parameters()}
    metrics = {k: torch.tensor(v[-1], dtype=torch.float64) for k, v in trainer._metrics["train"].items()}
    return batch, loss.detach().double(), grads, metrics


def truth64(batch, loss_type):
    """The float64 ground truth of TRL's step on ``batch``: plain logits of float64 models, no fused op."""
    policy = tiny_model("llama", dtype=torch.float64).train()
    ref = tiny_model("llama", dtype=torch.float64, seed=1)
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = ids.masked_fill(completion == 0, -100)

    def logps(model):
        return sequence_logprobs_reference(model(input_ids=ids, attention_mask=mask).logits, labels).sum(-1)

    s = logps(policy)
    with torch.no_grad():
        r = logps(ref)
    b = s.shape[0] // 2
    lengths = completion.sum(1).clamp(min=1).double()
    name = {"sigmoid": "dpo"}.get(loss_type, loss_type)
    loss = preference_loss(name, s[:b], s[b:], ref_chosen_logps=r[:b], ref_rejected_logps=r[b:],
                           chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], beta=0.1).losses.mean()
    loss.backward()
    rewards_w, rewards_l = 0.1 * (s[:b] - r[:b]).detach(), 0.1 * (s[b:] - r[b:]).detach()
    metrics = {"logps/chosen": s[:b].detach().mean(), "logps/rejected": s[b:].detach().mean(),
               "rewards/chosen": rewards_w.mean(), "rewards/rejected": rewards_l.mean(),
               "rewards/margins": (rewards_w - rewards_l).mean(),
               "rewards/accuracies": (rewards_w > rewards_l).double().mean()}
    return loss.detach(), {n: p.grad.detach() for n, p in policy.named_parameters()}, metrics


def close_to_truth(ours, theirs, truth, name):
    margin = 16 * EPS32 * max(truth.abs().max().item(), 1e-30)
    assert_close_to_reference(ours, truth, theirs, factor=2.0, margin=margin, name=name)


@requires_trl
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_trl_step_matches_stock_dpo_trainer(loss_type):
    from trl import DPOTrainer

    from entangle_fast.integrations.trl import EntangledDPOTrainer

    batch, loss_trl, grads_trl, metrics_trl = one_step(dpo_trainer(DPOTrainer, loss_type=loss_type))
    batch_ours, loss_ours, grads_ours, metrics_ours = one_step(dpo_trainer(EntangledDPOTrainer, loss_type=loss_type))
    assert all(torch.equal(batch[k], batch_ours[k]) for k in batch)
    loss64, grads64, metrics64 = truth64(batch, loss_type)
    # TRL itself must agree with the truth to float32 accuracy, else the comparison below says nothing.
    assert abs(loss_trl - loss64) <= 64 * EPS32 * abs(loss64), (loss_trl, loss64)
    close_to_truth(loss_ours, loss_trl, loss64, "loss")
    for name, g in grads64.items():
        close_to_truth(grads_ours[name], grads_trl[name], g, f"grad {name}")
    for key, value in metrics64.items():
        close_to_truth(metrics_ours[key], metrics_trl[key], value, key)
    assert metrics_ours["num_tokens"] == metrics_trl["num_tokens"]
    assert not any(k.startswith("entangle/") for k in metrics_ours)  # compute_loss alone is not a monitored step


@requires_trl
def test_trl_short_run_monitors_every_nth_step_and_cleans_up(monkeypatch):
    from entangle_fast.integrations import hf
    from entangle_fast.integrations.trl import EntangledDPOTrainer

    built = []
    monkeypatch.setattr(hf, "token_heatmap", lambda *a, **k: built.append(1))  # no image logger: never called
    trainer = dpo_trainer(EntangledDPOTrainer, steps=5, entangle_every=2, entangle_images_every=1)
    before = hook_state(trainer.model)
    history = train_and_check_loss(trainer, steps=5)
    monitored = entangle_logs(history)
    assert [h["step"] for h in monitored] == [1, 3, 5]  # global steps 0, 2, 4, logged after their optimizer step
    for h in monitored:
        assert ENTANGLE_KEYS <= h.keys()
        fractions = sum(h[f"entangle/case_{c}"] for c in ("ideal", "both_fall", "both_rise", "undefined"))
        assert math.isclose(fractions, 1.0)
        assert -1.0 <= h["entangle/cosine"] <= 1.0
    assert hook_state(trainer.model) == before
    assert not built


@requires_trl
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_trl_crash_mid_step_leaves_no_hooks(monkeypatch, where):
    from entangle_fast.integrations import trl as integration
    from entangle_fast.integrations.trl import EntangledDPOTrainer

    trainer = dpo_trainer(EntangledDPOTrainer, steps=2)
    before = hook_state(trainer.model)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    if where == "forward":  # after the policy forward, with the monitor's hooks in place
        monkeypatch.setattr(integration, "preference_loss", boom)
    else:  # after the backward ran, before the monitor's with-block closes
        backward = trainer.accelerator.backward

        def backward_then_boom(loss, **kwargs):
            backward(loss, **kwargs)
            boom()

        monkeypatch.setattr(trainer.accelerator, "backward", backward_then_boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert hook_state(trainer.model) == before
    monkeypatch.undo()
    trainer.train()  # the same trainer trains afterwards
    assert entangle_logs(trainer.state.log_history)


@requires_trl
def test_trl_lora_run_uses_the_disabled_adapter_as_reference():
    from peft import LoraConfig

    from entangle_fast.integrations.trl import EntangledDPOTrainer

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = dpo_trainer(EntangledDPOTrainer, steps=3, peft_config=config, lr=5e-2)
    trainer.train()
    monitored = entangle_logs(trainer.state.log_history)
    assert len(monitored) == 3
    first = trainer.state.log_history[0]
    assert first["rewards/margins"] == 0.0  # step 0: adapter output is zero, policy == reference exactly
    assert all(math.isfinite(h["entangle/inner"]) for h in monitored)


@requires_trl
def test_trl_images_only_with_an_image_logger():
    from transformers import TrainerCallback

    from entangle_fast.integrations.trl import EntangledDPOTrainer

    class Writer:
        def __init__(self):
            self.images = []

        def add_image(self, tag, image, step, dataformats):
            self.images.append((tag, image, step, dataformats))

    class ImageLogger(TrainerCallback):  # what transformers' TensorBoardCallback exposes: a writer with add_image
        tb_writer = Writer()

    logger = ImageLogger()
    trainer = dpo_trainer(EntangledDPOTrainer, steps=2, entangle_every=0, entangle_images_every=2, callbacks=[logger])
    trainer.train()
    assert [(tag, step, fmt) for tag, _, step, fmt in logger.tb_writer.images] == [
        ("entangle/token_matrix/pair0", 0, "HWC")]
    image = logger.tb_writer.images[0][1]
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    assert not entangle_logs(trainer.state.log_history)  # entangle_every=0: images without monitoring


@requires_trl
def test_trl_unsupported_configuration_falls_back_to_stock():
    from trl import DPOTrainer

    from entangle_fast.integrations.trl import EntangledDPOTrainer

    with pytest.warns(RuntimeWarning, match="ld_alpha"):
        ours = dpo_trainer(EntangledDPOTrainer, loss_type="sigmoid", warn=True, ld_alpha=0.5)
    assert ours.entangle_fallback
    stock = dpo_trainer(DPOTrainer, loss_type="sigmoid", ld_alpha=0.5)
    _, loss_ours, _, _ = one_step(ours)
    _, loss_stock, _, _ = one_step(stock)
    assert torch.equal(loss_ours, loss_stock)


@requires_trl
def test_patch_trl_swaps_and_restores_dpo_trainer():
    import trl
    import trl.trainer
    import trl.trainer.dpo_trainer as dpo_module

    from entangle_fast.integrations.trl import EntangledDPOTrainer, patch_trl, unpatch_trl

    stock = dpo_module.DPOTrainer
    try:
        patched = patch_trl()
        assert patched is EntangledDPOTrainer
        from trl import DPOTrainer

        assert DPOTrainer is trl.trainer.DPOTrainer is dpo_module.DPOTrainer is EntangledDPOTrainer
        custom = patch_trl(entangle_every=3)
        assert trl.DPOTrainer is custom and issubclass(custom, EntangledDPOTrainer)
        assert custom.entangle_defaults["entangle_every"] == 3
        trainer = dpo_trainer(trl.DPOTrainer)  # an existing script's construction, unchanged
        assert isinstance(trainer, EntangledDPOTrainer) and trainer.entangle.every == 3
        with pytest.raises(TypeError, match="unknown option"):
            patch_trl(entangle_evry=3)
    finally:
        unpatch_trl()
    assert trl.DPOTrainer is trl.trainer.DPOTrainer is dpo_module.DPOTrainer is stock


def test_trl_integration_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # an uninstalled package
    monkeypatch.delitem(sys.modules, "entangle_fast.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"pip install entangle-fast\[trl\]"):
        importlib.import_module("entangle_fast.integrations.trl")


@requires_trl
def test_trl_version_range_is_checked(monkeypatch):
    from entangle_fast.integrations.trl import TRL_MAX, TRL_MIN, _check_trl_version

    _check_trl_version(TRL_MIN)
    _check_trl_version("1.16.0")
    for version in ("0.28.1", TRL_MAX, "2.1.0"):
        with pytest.raises(ImportError, match=r"trl>=0\.29\.0,<2\.0\.0"):
            _check_trl_version(version)
    monkeypatch.setenv("ENTANGLE_FAST_SKIP_TRL_VERSION_CHECK", "1")
    _check_trl_version("0.1.0")


# ----------------------------------------------------------------------------------------------------------------------
# HF Trainer callback


class PairTrainer:
    """Builds a transformers.Trainer subclass whose compute_loss is DPO on per-sequence log-probs."""

    @staticmethod
    def make(steps=4, lr=1e-2, callback=None):
        from transformers import Trainer, TrainingArguments

        tok = build_tokenizer()
        reference = tiny_model("llama", seed=1).requires_grad_(False)

        class DPOOnLogprobs(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = wrapped_preference_logprobs(model, inputs)
                with torch.no_grad():
                    ref = preference_logprobs(reference, inputs)
                loss = preference_loss("dpo", out.chosen_logps, out.rejected_logps, ref_chosen_logps=ref.chosen_logps,
                                       ref_rejected_logps=ref.rejected_logps, beta=0.1).losses.mean()
                return (loss, {}) if return_outputs else loss

        args = TrainingArguments(output_dir=OUTDIR[0], max_steps=steps,
                                 per_device_train_batch_size=3, learning_rate=lr, lr_scheduler_type="constant",
                                 logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                                 remove_unused_columns=False, disable_tqdm=True, seed=0)
        trainer = DPOOnLogprobs(model=tiny_model("llama").train(), args=args, train_dataset=list(BUILTIN_PAIRS),
                                data_collator=lambda examples: encode_pairs(tok, examples))
        if callback is not None:
            callback.attach(trainer)
        return trainer


def test_callback_short_run_logs_and_cleans_up():
    from entangle_fast.integrations.hf import EntanglementCallback

    callback = EntanglementCallback(every=1)
    trainer = PairTrainer.make(steps=4, callback=callback)
    assert trainer.callback_handler.callbacks[0] is callback
    before = hook_state(trainer.model)
    history = train_and_check_loss(trainer, steps=4)
    monitored = entangle_logs(history)
    assert [h["step"] for h in monitored] == [1, 2, 3, 4]
    assert all(ENTANGLE_KEYS <= h.keys() for h in monitored)
    assert hook_state(trainer.model) == before
    callback.detach()
    assert "training_step" not in trainer.__dict__ and callback not in trainer.callback_handler.callbacks


def test_callback_crash_mid_step_leaves_no_hooks(monkeypatch):
    from entangle_fast.integrations.hf import EntanglementCallback

    trainer = PairTrainer.make(steps=2, callback=EntanglementCallback())
    before = hook_state(trainer.model)
    stock = type(trainer).compute_loss

    def crash_after_forward(self, model, inputs, **kwargs):
        stock(self, model, inputs, **kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(type(trainer), "compute_loss", crash_after_forward)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert hook_state(trainer.model) == before


def test_callback_must_be_attached():
    from entangle_fast.integrations.hf import EntanglementCallback

    trainer = PairTrainer.make(steps=1)
    trainer.add_callback(EntanglementCallback())
    with pytest.raises(RuntimeError, match="attach"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------------------------
# Plain PyTorch


def test_plain_pytorch_example_runs():
    import runpy

    example = runpy.run_path(str(ROOT / "examples" / "plain_pytorch_loop.py"))
    before = len(active_listeners())
    history = example["main"](steps=3, quiet=True)
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert all(ENTANGLE_KEYS <= h.keys() for h in history)
    # With SGD the first-order prediction has the sign of the actual change (the batch's cross terms are small here).
    assert all(h["entangle/predicted_delta_chosen"] * h["actual_delta_chosen"] > 0 for h in history)
    assert len(active_listeners()) == before


@requires_trl
def test_trl_empty_response_pairs_are_skipped_and_counted():
    """A pair whose chosen response lost every token (truncation) is left out of the step, counted and warned once."""
    from entangle_fast.integrations.trl import EntangledDPOTrainer

    trainer = dpo_trainer(EntangledDPOTrainer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    b = batch["input_ids"].shape[0] // 2
    kept_rows = [r for r in range(2 * b) if r not in (0, b)]
    without = {k: (v[kept_rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (2 * b,) else v)
               for k, v in batch.items()}
    want = trainer.compute_loss(trainer.model, without).detach()
    emptied = dict(batch)
    emptied["completion_mask"] = batch["completion_mask"].clone()
    emptied["completion_mask"][0] = 0
    with pytest.warns(UserWarning, match=r"pairs \[0\] of a batch of 3 have an empty"):
        got = trainer.compute_loss(trainer.model, emptied).detach()
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
    assert trainer._metrics["train"]["entangle/skipped_empty_pairs"][-1] == 1.0
