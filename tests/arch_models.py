"""Tiny random float64 causal LMs of transformers' own architectures, for exactness tests (no download).

:func:`tiny_arch` builds a ``*ForCausalLM`` from its config class with hidden size 16-32, 2 layers, 2 heads, a vocabulary
covering :func:`entangle_fast.models.build_tokenizer`, MoE with 4 experts top-2, dropout 0, in float64.

Why patches: many Hugging Face modules compute in float32 whatever the input dtype (RMSNorm variants, Gemma's
``(1 + w)`` norms, per-head q/k norms, MoE router softmaxes, eager attention's softmax). A "float64" model is then only
float32-accurate on those paths, and a 1e-8 comparison of gradients measures the model, not the monitor. Two fixes:

- ``attn_implementation="sdpa"`` where the model has it (SDPA keeps the input dtype through the softmax);
- every module whose own ``forward`` casts a float64 tensor down (found by :func:`low_precision_ops`) gets its forward
  rebound to the same code run under :class:`KeepFloat64` (casts of float64 tensors to float32/16 become no-ops,
  ``dtype=torch.float32`` arguments become float64): the same math, in float64. Rotary embeddings are patched the same
  way (their cos/sin are constants, but float64 constants keep the patched model a clean float64 function).

:func:`low_precision_ops` lists the ops that still yield a non-float64 tensor on the gradient path (empty for every
model built here), and :func:`finite_difference_error` checks that the gradient is smooth at float64 level.
"""
from __future__ import annotations

import inspect
import re
import types

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

VOCAB = 96  # build_tokenizer() has 91 tokens
HIDDEN = 16
LOW = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------------
# float64 everywhere
# ----------------------------------------------------------------------------------------------------------------------


class KeepFloat64(TorchFunctionMode):
    """Run code written for float32 upcasts in float64: a cast of a float64 tensor to a lower float dtype returns the
    tensor unchanged, and a ``dtype=`` low float argument of an op on float64 tensors becomes float64."""

    CASTS = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16}

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        f64 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)
        if f64 and func in self.CASTS:
            return args[0]
        if f64 and func is torch.Tensor.to:
            rest = list(args[1:])
            rest = [torch.float64 if (isinstance(a, torch.dtype) and a in LOW) else a for a in rest]
            if rest and isinstance(rest[0], torch.Tensor) and rest[0].dtype in LOW:
                rest[0] = torch.float64
            if kwargs.get("dtype") in LOW:
                kwargs["dtype"] = torch.float64
            return func(args[0], *rest, **kwargs)
        if f64 and func is torch.Tensor.type_as and isinstance(args[1], torch.Tensor) and args[1].dtype in LOW:
            return args[0]
        if f64 and kwargs.get("dtype") in LOW:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def _forward_in_float64(self, *args, **kwargs):
    with KeepFloat64():
        return type(self).forward(self, *args, **kwargs)


_UPCAST = re.compile(r"float32|\.float\(\)|dtype=torch\.float\b|torch\.float\)")


def upcasting_modules(model: nn.Module) -> list[str]:
    """Names of the modules with no child modules whose class ``forward`` casts to float32 (norms, routers, rotary)."""
    out = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        if _UPCAST.search(source):
            out.append(name)
    return out


def keep_float64(model: nn.Module, names=None) -> list[str]:
    """Rebind ``forward`` of the named modules (default :func:`upcasting_modules`) to run under :class:`KeepFloat64`.

    A bound method, so ``copy.deepcopy(model)`` rebinds it to the copy. Returns the patched names."""
    modules = dict(model.named_modules())
    names = upcasting_modules(model) if names is None else names
    for name in names:
        modules[name].forward = types.MethodType(_forward_in_float64, modules[name])
    return list(names)


class _LowPrecisionAudit(TorchFunctionMode):
    def __init__(self, stack):
        super().__init__()
        self.stack, self.found = stack, []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        for t in flat:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.requires_grad:
                where = self.stack[-1] if self.stack else "<model>"
                self.found.append((where, getattr(func, "__name__", str(func)), t.dtype))
                break
        return out


def low_precision_ops(model: nn.Module, input_ids, attention_mask=None) -> list[tuple[str, str, torch.dtype]]:
    """``(module class, op, dtype)`` of every op in one forward that yields a non-float64 tensor carrying gradient."""
    stack, handles = [], []

    def enter(module, args):
        stack.append(type(module).__name__)

    def leave(module, args, output):
        stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    audit = _LowPrecisionAudit(stack)
    try:
        with audit:
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return sorted(set(audit.found), key=str)


def finite_difference_error(model: nn.Module, input_ids, attention_mask=None, *, step: float = 1e-5,
                            seed: int = 0) -> float:
    """Relative error of the central difference of ``f = sum(logits * c)`` (unpadded positions) along a random unit direction of all
    parameters against autograd's directional derivative. A float32 op on the gradient path shows as ~1e-2."""
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((d * d).sum() for d in direction))
    direction = [d / norm for d in direction]
    with torch.no_grad():
        probe = model(input_ids=input_ids, attention_mask=attention_mask).logits
    c = torch.randn(probe.shape, generator=gen, dtype=probe.dtype)
    if attention_mask is not None:
        # Padded query positions are not scored: a fully masked attention row adds scores to finfo.min, where they
        # vanish in the forward but not in autograd's backward.
        c = c * attention_mask[..., None].to(c.dtype)

    def f():
        return (model(input_ids=input_ids, attention_mask=attention_mask).logits * c).sum()

    grads = torch.autograd.grad(f(), params, allow_unused=True)
    exact = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None)
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d, alpha=step)
        plus = f()
        for p, d in zip(params, direction):
            p.add_(d, alpha=-2 * step)
        minus = f()
        for p, d in zip(params, direction):
            p.add_(d, alpha=step)
    fd = (plus - minus) / (2 * step)
    return float((fd - exact).abs() / exact.abs().clamp(min=1e-300))


def _eager_attention_in_float64(module, *args, **kwargs):
    """The model's own ``eager_attention_forward`` (softmax in float32 as written) run in float64."""
    import sys

    eager = sys.modules[type(module).__module__].eager_attention_forward
    with KeepFloat64():
        return eager(module, *args, **kwargs)


FLOAT64_EAGER = "float64_eager"


def _register_float64_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(FLOAT64_EAGER, _eager_attention_in_float64)
    AttentionMaskInterface.register(FLOAT64_EAGER, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


# ----------------------------------------------------------------------------------------------------------------------
# The architectures
# ----------------------------------------------------------------------------------------------------------------------

SPECIAL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3)
LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=64, **SPECIAL)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=12)


def _configs() -> dict:
    """name -> (config class name, model class name, config kwargs)."""
    gemma = dict(LLAMA_LIKE, query_pre_attn_scalar=8, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"])
    return {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
            n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **SPECIAL)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_LIKE, tie_word_embeddings=False)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_LIKE)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_LIKE)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA_LIKE)),
        # Gemma 2: final_logit_softcapping=30 and attn_logit_softcapping=50 as in the released models (no SDPA).
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(gemma, final_logit_softcapping=30.0,
                                                            attn_logit_softcapping=50.0)),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(gemma)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(LLAMA_LIKE, resid_pdrop=0.0, embd_pdrop=0.0)),
        # OPT: learned positional embedding with offset 2, fc1/fc2 called on flattened [rows*positions, d] inputs.
        "opt": ("OPTConfig", "OPTForCausalLM", dict(
            hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=24, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, layerdrop=0.0, **SPECIAL)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
            hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, **SPECIAL)),
        # Falcon-7B layout: FalconLinear everywhere, multi-query, parallel attention, tied embeddings.
        "falcon": ("FalconConfig", "FalconForCausalLM", dict(
            hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, ffn_hidden_size=24,
            max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, **SPECIAL)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(LLAMA_LIKE)),
        # Granite: every multiplier away from 1, logits divided by logits_scaling after the head.
        "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
            LLAMA_LIKE, logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5,
            attention_multiplier=0.25)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
            LLAMA_LIKE, num_experts=4, norm_topk_prob=True, decoder_sparse_step=1, **MOE)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(LLAMA_LIKE, num_local_experts=4,
                                                              num_experts_per_tok=2)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
                                                        intermediate_size=12)),
    }


ARCHS = tuple(_configs()) + ("llama_lora",)


def _build(name: str, seed: int) -> nn.Module:
    import transformers as tf

    cfg_name, model_name, kwargs = _configs()[name]
    config = getattr(tf, cfg_name)(**kwargs)
    model_cls = getattr(tf, model_name)
    if model_cls._supports_sdpa:
        config._attn_implementation = "sdpa"
    else:
        _register_float64_eager()
        config._attn_implementation = FLOAT64_EAGER
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"  # grouped_mm has no float64 kernel on CPU
    torch.manual_seed(seed)
    return model_cls(config).to(torch.float64)


def _lora(model: nn.Module, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    # init_lora_weights=False: B random too, so A's gradient is not zero.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    return get_peft_model(model, config)


def tiny_arch(name: str, *, seed: int = 0) -> nn.Module:
    """A tiny random float64 causal LM of architecture ``name`` (one of :data:`ARCHS`), in eval mode.

    Every module whose forward upcasts to float32 runs in float64 (:func:`keep_float64`); attention is SDPA, or the
    model's eager attention in float64 where it has no SDPA (Gemma 2's soft-capped attention).
    """
    if name == "llama_lora":
        model = _lora(_build("llama", seed), seed)
    elif name in _configs():
        model = _build(name, seed)
    elif name in EXTRA_ARCHS:
        model = _build_generic(name, seed)
    else:
        raise ValueError(f"unknown architecture {name!r}; one of {ARCHS + EXTRA_ARCHS}")
    keep_float64(model)
    return model.eval()

# Further decoder-only causal LMs of transformers 5.23 that build from a tiny config in well under a second and are
# float64-exact after keep_float64; one per distinct module layout (the many Llama-shaped ones are left out to keep
# CI time small: apertus, arcee, cwm, doge, exaone4, glm, glm4, helium, hunyuan_v1_dense, hyperclovax, jais2,
# ministral, ministral3, nanochat, olmo3, seed_oss, smollm3, stablelm pass the same float64 checks).
EXTRA_ARCHS: tuple[str, ...] = (
    "gemma",  # GemmaRMSNorm (1 + w), scaled word embedding, tied head
    "phi",  # partial rotary, LayerNorm, dense with bias, parallel attention and MLP
    "starcoder2",  # LayerNorm, biased projections, sliding window
    "gpt_bigcode",  # multi-query fused c_attn (nn.Linear), learned positions, tied head
    "olmo",  # LayerNorm without parameters
    "nemotron",  # LayerNorm1P (1 + w), relu^2 MLP
    "persimmon",  # per-head q/k LayerNorms
    "biogpt",  # scaled word embedding, learned positional embedding with offset
    "qwen2_moe",  # MoE with a shared expert and its sigmoid gate
)

GENERIC = dict(LLAMA_LIKE, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, n_inner=24, num_experts=4,
               num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=12)


def _build_generic(name: str, seed: int) -> nn.Module:
    """A model from its auto-mapped config class with the tiny sizes of :data:`GENERIC` and every dropout at 0."""
    import transformers as tf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = CONFIG_MAPPING[name]()
    for key, value in GENERIC.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key in list(config.to_dict()):
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    model_cls = getattr(tf, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name])
    config._attn_implementation = "sdpa" if model_cls._supports_sdpa else "eager"
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(config).to(torch.float64)
