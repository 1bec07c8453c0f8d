"""Hugging Face ``Trainer`` integration: the entanglement monitor around training steps, its scalars in the trainer's
logs, token heat-maps for loggers that take images.

:class:`EntanglementCallback` is for custom ``Trainer`` subclasses whose ``compute_loss`` builds a preference loss from
per-sequence log-probs (TRL's row layout: rows 0..B-1 chosen, B..2B-1 rejected, one ``[2B, T]`` forward per step),
best computed with :func:`entangle_fast.preference_logprobs` (or, for a wrapped model,
:func:`entangle_fast.integrations.distributed.wrapped_preference_logprobs`), whose fused op hands the monitor the loss
coefficients; a ``compute_loss`` that computes log-probs another way can call ``callback.monitor.watch(...)``.

:class:`StepMonitor` is the part shared with :class:`entangle_fast.integrations.trl.EntangledDPOTrainer`: which steps
are monitored, the ``with`` block around the step (so a step that raises leaves no hook behind), the cross-rank means
and the images.

Scalars (prefix ``entangle/``, :data:`entangle_fast.integrations.distributed.METRICS`): means over the pairs of the
step, reduced over data-parallel ranks. ``predicted_delta_*`` is the first-order change of a pair's log-probs under a
plain SGD step at the current learning rate (docs/math.md section 2); under Adam it indicates the direction of the
pressure on each log-prob, not the size of the change.

Images: a heat-map of the output-layer token matrix K[t, s] (docs/math.md section 3.1) of the first pair, built only on
the main process, only at image steps, and only when a logger that takes images is configured (a TensorBoard writer or
an initialised W&B run among the trainer's callbacks); otherwise no statistics are requested and no image is built.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from typing import Any, Callable

from torch import nn
from transformers import TrainerCallback

from entangle_fast.integrations.distributed import entanglement_metrics, unwrap_model
from entangle_fast.token_stats import BackwardRecord, register_stats_listener

__all__ = ["EntanglementCallback", "StepMonitor", "image_sinks", "token_heatmap"]

ImageSink = Callable[[str, Any, int], None]


# ----------------------------------------------------------------------------------------------------------------------
# Image loggers


def image_sinks(trainer) -> list[ImageSink]:
    """``sink(tag, image [H, W, 3] uint8, step)`` for each configured logger that takes images (empty otherwise).

    Recognised: a callback holding a TensorBoard-style writer (``tb_writer`` with ``add_image``; transformers'
    ``TensorBoardCallback`` once training began) and transformers' ``WandbCallback`` with an initialised run.
    """
    sinks: list[ImageSink] = []
    for cb in trainer.callback_handler.callbacks:
        writer = getattr(cb, "tb_writer", None)
        if writer is not None and callable(getattr(writer, "add_image", None)):
            sinks.append(lambda tag, img, step, w=writer: w.add_image(tag, img, step, dataformats="HWC"))
            continue
        run = getattr(cb, "_wandb", None)
        if getattr(cb, "_initialized", False) and run is not None and hasattr(run, "Image"):
            sinks.append(lambda tag, img, step, r=run: r.log({tag: r.Image(img), "train/global_step": step}))
    return sinks


def token_heatmap(record: BackwardRecord, tokenizer=None, pair: int = 0):
    """A ``[H, W, 3]`` uint8 heat-map of one pair's output-layer token matrix K[t, s] (chosen tokens down, rejected
    tokens across), from the record the fused log-prob backward hands its listeners."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = record.stats
    n_w, n_l = int(stats.chosen_lengths[pair]), int(stats.rejected_lengths[pair])
    k = stats.token_matrix[pair, :n_w, :n_l].detach().double().cpu().numpy()
    labels = record.labels.reshape(record.rows_shape).cpu()
    row_w, row_l = (int(r) for r in stats.pairs[pair])
    ids_w = labels[row_w, stats.chosen_positions[pair, :n_w].cpu()].tolist()
    ids_l = labels[row_l, stats.rejected_positions[pair, :n_l].cpu()].tolist()
    names = getattr(tokenizer, "convert_ids_to_tokens", None)
    tok_w = names(ids_w) if names else [str(i) for i in ids_w]
    tok_l = names(ids_l) if names else [str(i) for i in ids_l]

    fig = Figure(figsize=(1.2 + 0.35 * max(n_l, 4), 1.0 + 0.3 * max(n_w, 4)), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bound = float(abs(k).max()) if k.size else 1.0
    im = ax.imshow(k, cmap=matplotlib.colormaps["RdBu_r"], vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(n_l), tok_l, rotation=90, fontsize=7)
    ax.set_yticks(range(n_w), tok_w, fontsize=7)
    ax.set_xlabel("rejected tokens")
    ax.set_ylabel("chosen tokens")
    ax.set_title(f"output-layer token matrix K, pair {pair} (sum {k.sum():.3g})", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ----------------------------------------------------------------------------------------------------------------------
# The monitored step


def current_lr(trainer) -> float:
    """The learning rate the coming optimizer step uses."""
    opt = getattr(trainer, "optimizer", None)
    groups = getattr(opt, "param_groups", None)
    if groups:
        return float(groups[0]["lr"])
    return float(trainer.args.learning_rate)


def data_parallel_size(trainer) -> int:
    """Ranks whose gradients are averaged: all processes, except that tensor-parallel ranks share one batch."""
    acc = getattr(trainer, "accelerator", None)
    n = int(getattr(acc, "num_processes", 1) or 1)
    tp = getattr(getattr(acc, "parallelism_config", None), "tp_size", 1) or 1
    return max(1, n // int(tp))


class StepMonitor:
    """Runs training steps inside an :class:`~entangle_fast.monitor.EntanglementMonitor` and turns their statistics
    into logged means.

    Args:
        every: monitor the micro-batches of optimizer steps whose ``global_step % every == 0`` (0 turns it off).
        mode, params, monitor_kwargs: passed to :class:`~entangle_fast.monitor.EntanglementMonitor`.
        images_every: token heat-maps at ``global_step % images_every == 0`` (0 or None: never).
        prefix: of the logged scalars.
    """

    def __init__(self, *, every: int = 1, mode: str = "exact", params=None, monitor_kwargs: dict | None = None,
                 images_every: int | None = 100, prefix: str = "entangle/"):
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0: never), got {every!r}")
        if images_every is not None and (not isinstance(images_every, int) or images_every < 0):
            raise ValueError(f"images_every must be an int >= 0 or None, got {images_every!r}")
        self.every, self.mode, self.params = every, mode, params
        self.monitor_kwargs = dict(monitor_kwargs or {})
        self.images_every, self.prefix = images_every or 0, prefix
        self.monitor = None  # the current EntanglementMonitor (kept across steps: coverage is built once)
        self._model_id = None
        self._warned: set[str] = set()
        self.last_stats = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def _monitor_for(self, model: nn.Module):
        from entangle_fast.monitor import EntanglementMonitor

        inner = unwrap_model(model)
        if self.monitor is None or self._model_id != id(inner):
            self.monitor = EntanglementMonitor(inner, params=self.params, mode=self.mode, **self.monitor_kwargs)
            self._model_id = id(inner)
        return self.monitor

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def run(self, trainer, model: nn.Module, step_fn: Callable[[], Any], on_metrics: Callable[[dict], None]):
        """``step_fn()`` (forward, loss, backward of one micro-batch), monitored when due; returns its result.

        On a monitored step every rank reduces the metrics (one all-reduce) and hands ``on_metrics`` the finite means.
        """
        step = trainer.state.global_step
        monitored = self.due(step)
        sinks = []
        if self.images_every and step % self.images_every == 0 and trainer.is_world_process_zero():
            sinks = image_sinks(trainer)
        if not monitored and not sinks:
            return step_fn()
        records: list[BackwardRecord] = []
        mon = self._monitor_for(model) if monitored else None
        with contextlib.ExitStack() as stack:
            if sinks:
                stack.callback(register_stats_listener(records.append).remove)
            if mon is not None:
                stack.enter_context(mon)
            result = step_fn()
        if mon is not None:
            stats = None
            try:
                stats = mon.stats
            except Exception as err:  # noqa: BLE001 - a monitor failure must not stop training, nor other ranks
                self._warn_once(f"entanglement statistics unavailable this step: {err}")
            self.last_stats = stats
            metrics = entanglement_metrics(stats, lr=current_lr(trainer), prefix=self.prefix,
                                           grad_divisor=data_parallel_size(trainer))
            on_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        if sinks and records:
            self._log_images(trainer, records[-1], sinks, step)
        return result

    def _log_images(self, trainer, record: BackwardRecord, sinks: list[ImageSink], step: int) -> None:
        try:
            image = token_heatmap(record, getattr(trainer, "processing_class", None), pair=0)
        except Exception as err:  # noqa: BLE001 - a plotting problem must not stop training
            self._warn_once(f"token heat-map not drawn: {err}")
            return
        for sink in sinks:
            sink(f"{self.prefix}token_matrix/pair0", image, step)


# ----------------------------------------------------------------------------------------------------------------------
# The callback


class EntanglementCallback(TrainerCallback):
    """Entanglement statistics of a ``Trainer`` whose ``compute_loss`` is a preference loss of per-sequence log-probs.

    Attach it to the trainer (``EntanglementCallback(every=10).attach(trainer)``); ``trainer.add_callback`` alone is not
    enough, because a callback event cannot enclose a step: the monitor's hooks must be removed even when a step
    raises, and only a ``with`` block around the step guarantees that. ``attach`` wraps the trainer's
    ``training_step`` in that block and puts the callback first, so that the ``entangle/`` scalars it adds at each log
    reach ``trainer.state.log_history`` and every reporting callback (console, TensorBoard, W&B).

    Args: as :class:`StepMonitor`.
    """

    def __init__(self, *, every: int = 1, mode: str = "exact", params=None, monitor_kwargs: dict | None = None,
                 images_every: int | None = 100, prefix: str = "entangle/"):
        self.runner = StepMonitor(every=every, mode=mode, params=params, monitor_kwargs=monitor_kwargs,
                                  images_every=images_every, prefix=prefix)
        self._pending: dict[str, list[float]] = defaultdict(list)
        self._trainer = None

    @property
    def monitor(self):
        """The :class:`~entangle_fast.monitor.EntanglementMonitor` of the step in progress (None before the first)."""
        return self.runner.monitor

    def attach(self, trainer) -> "EntanglementCallback":
        if self._trainer is not None:
            raise RuntimeError("this EntanglementCallback is already attached to a trainer")
        handler = trainer.callback_handler
        handler.callbacks[:] = [cb for cb in handler.callbacks if cb is not self]
        handler.callbacks.insert(0, self)
        original = trainer.training_step

        def training_step(model, *args, **kwargs):
            return self.runner.run(trainer, model, lambda: original(model, *args, **kwargs), self._collect)

        trainer.training_step = training_step
        self._trainer = trainer
        return self

    def detach(self) -> None:
        trainer, self._trainer = self._trainer, None
        if trainer is None:
            return
        trainer.__dict__.pop("training_step", None)
        handler = trainer.callback_handler
        handler.callbacks[:] = [cb for cb in handler.callbacks if cb is not self]

    def _collect(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self._pending[key].append(value)

    def on_train_begin(self, args, state, control, **kwargs):
        if self._trainer is None:
            raise RuntimeError("EntanglementCallback must be attached: EntanglementCallback(...).attach(trainer), "
                               "not trainer.add_callback(...) (see its docstring)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._pending or any(k.startswith("eval_") for k in logs):
            return
        means = {k: sum(v) / len(v) for k, v in self._pending.items() if v}
        self._pending.clear()
        logs.update(means)
        # Trainer.log appended a copy of `logs` to the history just before this event.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)
