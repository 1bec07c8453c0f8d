"""preference_logprobs against a plain Hugging Face forward (model(...).logits) on tiny models built in code."""
import pytest
import torch

from entangle_fast import preference_logprobs
from entangle_fast.models import BUILTIN_PAIRS, TinyConfig, build_tokenizer, encode_pairs, tiny_model
from entangle_fast.reference import sequence_logprobs_reference
from helpers import assert_exact64

ARCHS = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def model_for(arch, tokenizer, dtype=torch.float64):
    return tiny_model(arch, TinyConfig(vocab_size=len(tokenizer), hidden_size=16, num_layers=2), dtype=dtype)


def left_pad(batch):
    """Move each row's padding to the left."""
    out = {k: torch.empty_like(v) for k, v in batch.items()}
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    for r in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][r].sum())
        for k in out:
            out[k][r] = fill[k]
            out[k][r, -n:] = batch[k][r, :n]
    return out


def plain_hf(model, batch):
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids).logits
    return sequence_logprobs_reference(logits, batch["labels"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_matches_plain_forward(arch, padding, tokenizer):
    model = model_for(arch, tokenizer)
    batch = encode_pairs(tokenizer, BUILTIN_PAIRS)
    if padding == "left":
        batch = left_pad(batch)
    ours = preference_logprobs(model, batch)
    ref = plain_hf(model, batch)
    b = len(BUILTIN_PAIRS)
    assert_exact64(torch.cat([ours.chosen_token_logps, ours.rejected_token_logps]), ref, rtol=1e-10)
    assert_exact64(ours.chosen_logps, ref[:b].sum(-1), rtol=1e-10, name="chosen sums")
    assert_exact64(ours.rejected_logps, ref[b:].sum(-1), rtol=1e-10, name="rejected sums")
    lengths = (batch["labels"][:, 1:] != -100).sum(-1)
    assert ours.chosen_lengths.tolist() == lengths[:b].tolist()
    assert_exact64(ours.chosen_mean_logps, ref[:b].sum(-1) / lengths[:b], rtol=1e-10, name="chosen means")


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_plain_forward(arch, tokenizer):
    model = model_for(arch, tokenizer)
    batch = encode_pairs(tokenizer, BUILTIN_PAIRS)
    params = [p for p in model.parameters() if p.requires_grad]
    out = preference_logprobs(model, batch)
    ours = torch.autograd.grad((out.chosen_logps - 2 * out.rejected_logps).sum(), params)
    ref = plain_hf(model, batch).sum(-1)
    b = len(BUILTIN_PAIRS)
    theirs = torch.autograd.grad((ref[:b] - 2 * ref[b:]).sum(), params)
    for (name, _), a, e in zip(model.named_parameters(), ours, theirs):
        assert_exact64(a, e, rtol=1e-10, name=f"grad {name}")


def test_left_padding_scores_like_no_padding(tokenizer):
    model = model_for("llama", tokenizer)
    batch = encode_pairs(tokenizer, BUILTIN_PAIRS)
    padded = preference_logprobs(model, left_pad(batch))
    alone = preference_logprobs(model, encode_pairs(tokenizer, BUILTIN_PAIRS[:1]))
    assert_exact64(padded.chosen_logps[0], alone.chosen_logps[0], rtol=1e-10, name="left-padded row")


def test_trl_layouts_agree(tokenizer):
    model = model_for("qwen2", tokenizer)
    batch = encode_pairs(tokenizer, BUILTIN_PAIRS)
    base = preference_logprobs(model, batch)
    # TRL >= 0.29: completion_mask instead of labels.
    completion = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": (batch["labels"] != -100).long()}
    assert_exact64(preference_logprobs(model, completion).chosen_logps, base.chosen_logps, name="completion_mask")
    # TRL 0.12-0.28: prompt (left-padded) and responses (right-padded) apart.
    split = split_layout(tokenizer, BUILTIN_PAIRS)
    out = preference_logprobs(model, split)
    assert_exact64(out.chosen_logps, base.chosen_logps, rtol=1e-10, name="split chosen")
    assert_exact64(out.rejected_logps, base.rejected_logps, rtol=1e-10, name="split rejected")


def split_layout(tok, pairs):
    prompts = [[tok.bos_token_id] + tok.encode(p["prompt"], add_special_tokens=False) for p in pairs]
    width = max(map(len, prompts))
    out = {"prompt_input_ids": torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
           "prompt_attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}
    for side in ("chosen", "rejected"):
        resp = [tok.encode(p[side], add_special_tokens=False) + [tok.eos_token_id] for p in pairs]
        w = max(map(len, resp))
        out[f"{side}_input_ids"] = torch.tensor([r + [0] * (w - len(r)) for r in resp])
        out[f"{side}_attention_mask"] = torch.tensor([[1] * len(r) + [0] * (w - len(r)) for r in resp])
    return out


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda b: {"attention_mask": b["attention_mask"]}, KeyError, "input_ids"),
        (lambda b: {"input_ids": b["input_ids"]}, KeyError, "labels"),
        (lambda b: {**b, "input_ids": b["input_ids"][:5]}, ValueError, r"\[2B, T\]"),
        (lambda b: {**b, "labels": b["labels"][:, :3]}, ValueError, "labels shape"),
        (lambda b: {**b, "attention_mask": b["attention_mask"][:, :3]}, ValueError, "attention_mask shape"),
    ],
)
def test_bad_batches(mutate, exc, match, tokenizer):
    model = model_for("llama", tokenizer, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        preference_logprobs(model, mutate(encode_pairs(tokenizer, BUILTIN_PAIRS)))


def test_logits_the_forward_does_not_produce_are_refused(tokenizer, monkeypatch):
    """A config that names a soft-cap the model's forward never applies: the parity probe on the first batch refuses it
    (the fused op would apply the cap); switched off, the fused log-probs are those of the capped logits."""
    from entangle_fast.preference import LogitParityError

    batch = encode_pairs(tokenizer, BUILTIN_PAIRS)
    model = model_for("llama", tokenizer, dtype=torch.float32)
    model.config.final_logit_softcapping = 0.01  # the tiny model's logits are O(0.1): a cap that bites
    with pytest.raises(LogitParityError, match=r"LlamaForCausalLM.*softcap=0.01"):
        preference_logprobs(model, batch)
    monkeypatch.setenv("ENTANGLE_FAST_CHECK_PARITY", "0")
    capped = preference_logprobs(model, batch)
    monkeypatch.delenv("ENTANGLE_FAST_CHECK_PARITY")
    assert torch.equal(capped.chosen_logps, preference_logprobs(model, batch, check_parity=False).chosen_logps)

    model.config.final_logit_softcapping = None
    assert torch.isfinite(preference_logprobs(model, batch).chosen_logps).all()  # now the probe passes

    model.config.logits_scaling = 2.0  # a scaling whose direction is unknown for this model type
    with pytest.raises(NotImplementedError, match="logits_scaling=2.0"):
        preference_logprobs(model, batch)