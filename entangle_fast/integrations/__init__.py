"""Training-framework integrations of the entanglement monitor, one module per framework.

- :mod:`entangle_fast.integrations.trl`: ``EntangledDPOTrainer`` (a ``trl.DPOTrainer``), ``patch_trl``/``unpatch_trl``.
  Needs ``pip install entangle-fast[trl]``.
- :mod:`entangle_fast.integrations.hf`: ``EntanglementCallback`` for custom ``transformers.Trainer`` subclasses.
- :mod:`entangle_fast.integrations.distributed`: the model call through DDP/FSDP2/PEFT wrappers and the cross-rank
  reduction of the logged means.

Plain PyTorch loops need none of these: see ``examples/plain_pytorch_loop.py``. Importing this package imports no
framework; each submodule imports its own.
"""

__all__ = ["trl", "hf", "distributed"]
