"""What a new user meets first: a readable ``EntanglementStats``, clear errors for bad models and empty responses, and
a warning when dropout changes what the monitor measures (entangle_fast/monitor/preflight.py)."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import entangle_fast as ef
from entangle_fast.monitor import preflight
from entangle_fast.monitor.stats import CASE_NAMES, EntanglementStats, classify
from entangle_fast.models import BUILTIN_PAIRS, build_tokenizer, encode_pairs, tiny_model
from entangle_fast.preference import empty_responses



def random_stats(b: int, seed: int = 0) -> EntanglementStats:
    g = torch.Generator().manual_seed(seed)
    nw, nl = torch.rand(b, generator=g, dtype=torch.float64) * 5 + 0.5, torch.rand(b, generator=g, dtype=torch.float64) * 5 + 0.5
    inner = (torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1) * (nw * nl).sqrt()
    a_w = -torch.rand(b, generator=g, dtype=torch.float64) / b
    a_l = torch.rand(b, generator=g, dtype=torch.float64) / b
    a_w[0] = 0.0  # one zero coefficient: case 0, its statistics stay as given
    case, falls, rises = classify(inner, nw, nl, a_w, a_l)
    per_module = {f"layers.{i}.proj": (inner / 21, nw / 21, nl / 21) for i in range(21)}
    return EntanglementStats(inner=inner, chosen_sq_norm=nw, rejected_sq_norm=nl, cosine=inner / (nw * nl).sqrt(),
                             a_w=a_w, a_l=a_l, case=case, chosen_falls=falls, rejected_rises=rises,
                             zero_coefficient=(a_w == 0) | (a_l == 0), per_module=per_module,
                             pairs=torch.stack([torch.arange(b), torch.arange(b) + b], 1))


# ----------------------------------------------------------------------------------------------------------------------
# Item 2: the readable summary


@pytest.mark.parametrize("lr", [None, 0.05])
def test_summary_lists_each_pair_with_its_numbers(lr):
    stats = random_stats(7)
    text = stats.summary(lr=lr)
    lines = text.splitlines()
    assert lines[0].startswith("EntanglementStats: 7 pairs") and "21 module terms" in lines[0]
    assert lines[1].split() == ["pair", "inner", "N_w", "N_l", "cosine", "case"] + (
        ["ds_w/lr", "ds_l/lr"] if lr is None else ["ds_w", "ds_l"])
    dw, dl = stats.predicted_delta(1.0 if lr is None else lr)
    assert len(lines) == 2 + 7
    for i, line in enumerate(lines[2:]):
        fields = line.split()
        case = CASE_NAMES[int(stats.case[i])]
        assert fields[0] == str(i) and " ".join(fields[5:5 + len(case.split())]) == case, line
        numbers = [float(x) for x in fields[1:5] + fields[5 + len(case.split()):]]
        truth = [stats.inner[i], stats.chosen_sq_norm[i], stats.rejected_sq_norm[i], stats.cosine[i], dw[i], dl[i]]
        for got, want in zip(numbers, truth):
            # printed to 3 significant digits (cosine to 3 decimals): half a unit of the last printed digit
            assert abs(got - float(want)) <= 5e-3 * abs(float(want)) + 5e-4, (i, line, got, float(want))


def test_repr_is_the_summary_not_the_tensors():
    stats = random_stats(20)
    text = repr(stats)
    assert text == stats.summary() and "tensor(" not in text and "per_module" in text.splitlines()[0]
    assert len(text.splitlines()) == 2 + 16 + 1 and text.splitlines()[-1].startswith("... 4 more pairs")
    counts = {name: int((stats.case == c).sum()) for c, name in CASE_NAMES.items() if (stats.case == c).any()}
    assert all(f"{name} {k}" in text.splitlines()[0] for name, k in counts.items()), (counts, text.splitlines()[0])


# ----------------------------------------------------------------------------------------------------------------------
# Items 4 and 5: clear errors in preference_logprobs


@pytest.fixture(scope="module")
def batch():
    return encode_pairs(build_tokenizer(), BUILTIN_PAIRS)


def test_empty_responses_are_refused_by_row(batch):
    b = len(BUILTIN_PAIRS)
    bad = {k: v.clone() for k, v in batch.items()}
    bad["labels"][1] = -100          # chosen row of pair 1
    bad["labels"][b + 2, 1:] = -100  # rejected row of pair 2 (the first label never counts: shifted away)
    assert empty_responses(bad["labels"]) == ([1], [2])
    assert empty_responses(batch["labels"]) == ([], [])
    with pytest.raises(ValueError, match=r"chosen row 1, rejected row 2 of 3 pairs"):
        ef.preference_logprobs(tiny_model("llama"), bad)


def test_completion_mask_without_response_is_refused(batch):
    b = len(BUILTIN_PAIRS)
    mask = (batch["labels"] != -100).long()
    mask[b] = 0
    trl_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "completion_mask": mask}
    with pytest.raises(ValueError, match=r"empty response .* rejected row 0 "):
        ef.preference_logprobs(tiny_model("llama"), trl_batch)


def test_not_a_causal_lm_is_named(batch):
    model = nn.Sequential(nn.Embedding(160, 8), nn.Linear(8, 160))
    with pytest.raises(TypeError, match=r"Sequential is not a Hugging Face causal LM \(no get_output_embeddings or "
                                        r"base_model\)"):
        ef.preference_logprobs(model, batch)


# ----------------------------------------------------------------------------------------------------------------------
# Items 3 and 5: preflight checks, directly and through the monitor


def test_check_model_names_the_model_with_nothing_to_track():
    frozen = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has \d+ parameters, none with requires_grad=True"):
        preflight.check_model(frozen, [])
    with pytest.raises(ValueError, match="Sequential has no parameters"):
        preflight.check_model(nn.Sequential(nn.ReLU()), [])
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no parameter of LlamaForCausalLM is tracked"):
        preflight.check_model(model, [])
    preflight.check_model(model, list(model.parameters()))  # a tracked set: accepted


def test_monitor_refuses_a_frozen_model():
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        ef.EntanglementMonitor(tiny_model("llama").requires_grad_(False))


def gpt2_with_dropout():
    import transformers as tf

    config = tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=64)  # default dropout 0.1
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(config)


def test_dropout_warns_once_per_model_in_training_mode():
    model = gpt2_with_dropout().train()
    with pytest.warns(preflight.ActiveDropoutWarning, match=r"GPT2LMHeadModel .*dropout .*p=0\.1.*model\.eval\(\)"):
        assert preflight.warn_if_dropout(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not preflight.warn_if_dropout(model)           # once per model
        assert not preflight.warn_if_dropout(gpt2_with_dropout().eval())   # no dropout in eval mode
        assert not preflight.warn_if_dropout(tiny_model("llama").train())  # attention_dropout 0, no Dropout modules
    llama = tiny_model("llama").train()
    llama.config.attention_dropout = 0.1                      # functional dropout: found through the config
    with pytest.warns(preflight.ActiveDropoutWarning, match=r"config\.attention_dropout=0\.1"):
        assert preflight.warn_if_dropout(llama)


def test_dropout_warning_does_not_keep_the_model_alive():
    model = gpt2_with_dropout().train()
    with pytest.warns(preflight.ActiveDropoutWarning):
        preflight.warn_if_dropout(model)
    before = len(preflight._warned)
    del model
    gc.collect()
    assert len(preflight._warned) == before - 1


def test_monitor_warns_on_active_dropout():
    model = gpt2_with_dropout().train()
    with pytest.warns(preflight.ActiveDropoutWarning):
        with ef.EntanglementMonitor(model):
            pass
