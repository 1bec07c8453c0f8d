"""Models: tiny causal LMs and a word-level tokenizer built in code (the embedded defaults of the CLI, tests and
examples), the loader of a local Hugging Face checkpoint, and the one table of dtype names.

Nothing here downloads anything. The tokenizer is a ``transformers.PreTrainedTokenizerFast`` over a fixed word list
(whitespace split, lower case), so decoded tokens read as words in tables and heat-maps.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import torch

# The pairs and the encoder live in entangle_fast.data; imported here too, the path the tests and examples use.
from entangle_fast.data import BUILTIN_PAIRS, encode_pairs  # noqa: F401

# Dtype names of the CLI and the Python API (``--dtype``); "auto" (keep the checkpoint's) is handled by resolve_dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]

# Words of the built-in sentiment-style preference data (docs: the paper's sentiment study in miniature).
BASE_WORDS = (
    "the a an this that it is was be and or but so very quite really not movie film book story plot acting music "
    "review rate my i you we they he she of in on to for with as at by from positive negative good bad great "
    "terrible fine okay sentiment overall summary answer question what how why was felt feel think say says said "
    "liked loved hated enjoyed boring exciting ending characters scenes one two three because too much more less "
    ": . , ! ?"
).split()


def build_tokenizer(extra_words: list[str] | tuple[str, ...] = ()):
    """A word-level fast tokenizer over :data:`BASE_WORDS` plus ``extra_words``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>`` (ids 0-3);
    unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in list(BASE_WORDS) + [w.lower() for w in extra_words]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


@dataclass
class TinyConfig:
    """Size of a tiny model: ``vocab_size`` must cover the tokenizer."""

    vocab_size: int = 160
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    max_positions: int = 128


def tiny_model(arch: str = "llama", cfg: TinyConfig | None = None, *, seed: int = 0, dtype=torch.float32):
    """A randomly initialised causal LM built from a config object (no download).

    Args:
        arch: ``"llama"`` (untied head), ``"qwen2"`` (q/k/v biases), ``"gpt2"`` (Conv1D layers, tied embeddings).
        cfg: sizes; default :class:`TinyConfig`.
        seed: initialisation seed.
        dtype: parameter dtype. For float64, RMSNorm is made to compute in float64 too (Hugging Face's Llama and
            Qwen2 norms upcast to float32 only), so a float64 model is float64-exact.
    """
    import transformers as tf

    cfg = cfg or TinyConfig()
    common = dict(vocab_size=cfg.vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch in ("llama", "qwen2"):
        kw = dict(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_positions, tie_word_embeddings=False, **common,
        )
        config = tf.LlamaConfig(**kw) if arch == "llama" else tf.Qwen2Config(**kw)
        model_cls = tf.LlamaForCausalLM if arch == "llama" else tf.Qwen2ForCausalLM
    elif arch == "gpt2":
        config = tf.GPT2Config(
            n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_positions=cfg.max_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
        model_cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"arch must be 'llama', 'qwen2' or 'gpt2', got {arch!r}")
    # SDPA keeps the input dtype through the softmax (the eager path takes it in float32), so float64 stays float64.
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    if dtype == torch.float64:
        _float64_norms(model)
    return model.eval()


def _rms_norm_in_input_dtype(self, hidden):
    variance = hidden.pow(2).mean(-1, keepdim=True)
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return self.weight * (hidden * torch.rsqrt(variance + eps))


def _float64_norms(model) -> None:
    """Make Llama/Qwen2 RMSNorm compute in the input dtype (they upcast to float32 whatever the input).

    The replacement is a bound method, so ``copy.deepcopy(model)`` rebinds it to the copy's own weights.
    """
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)


# ----------------------------------------------------------------------------------------------------------------------
# Device, dtype and loading
# ----------------------------------------------------------------------------------------------------------------------


def resolve_dtype(dtype) -> torch.dtype | None:
    """A ``torch.dtype`` from a name of :data:`DTYPES` (or a ``torch.dtype`` as it is); ``"auto"`` gives None (keep
    the checkpoint's dtype).

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device="auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def load_model(path, *, device="auto", dtype="auto"):
    """``(model, tokenizer)`` from a local Hugging Face folder (``AutoModelForCausalLM``/``AutoTokenizer``, local files
    only, never a download), in eval mode on ``device``; ``dtype="auto"`` keeps the checkpoint's dtype.

    Raises:
        FileNotFoundError: the path does not exist. ValueError: it holds no loadable causal LM and tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist: no such directory (--model takes a local "
                                "Hugging Face folder)")
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     dtype=torch_dtype if torch_dtype is not None else "auto")
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot load a causal LM and its tokenizer from {str(path)!r}: {first}") from None
    return model.to(dev).eval(), tokenizer


def builtin_model(arch: str = "llama", *, device="auto", dtype="auto", seed: int = 0, cfg: TinyConfig | None = None,
                  extra_words=()):
    """``(model, tokenizer)``: :func:`tiny_model` and :func:`build_tokenizer` (``extra_words`` added), in eval mode on
    ``device``; ``cfg`` defaults to :class:`TinyConfig` sized to the tokenizer (its ``vocab_size`` is always set to
    the tokenizer's); ``dtype="auto"`` is float32."""
    tokenizer = build_tokenizer(extra_words)
    cfg = TinyConfig() if cfg is None else cfg
    cfg = TinyConfig(**{**cfg.__dict__, "vocab_size": len(tokenizer)})
    model = tiny_model(arch, cfg, seed=seed, dtype=resolve_dtype(dtype) or torch.float32)
    return model.to(resolve_device(device)).eval(), tokenizer
