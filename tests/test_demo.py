"""The demo (`entangle-fast demo`): the paper's finding at reduced size on a fixed seed, its outputs, and its CLI paths.

The CLI tests register the demo in ``cli.COMMANDS`` themselves (monkeypatch), so they exercise ``cli.main``'s own
error handling whether or not the command list names the demo yet.
"""
from __future__ import annotations

import json

import pytest
import torch

from entangle_fast import cli
from entangle_fast.data import load_pairs
from entangle_fast.demo import DemoConfig, builtin_sets, encode_preference_batch, run_demo
from entangle_fast.models import TinyConfig, build_tokenizer, tiny_model


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    result = run_demo(DemoConfig(steps=20, out=str(out), progress=False, full_table=True), print_fn=lines.append)
    return result, json.loads(result.json_path.read_text()), "\n".join(lines)


def test_reduced_demo_shows_the_papers_finding(reduced_run):
    _, log, _ = reduced_run
    s = log["summary"]
    cos = [s[name]["dpo"]["cosine_mean"] for name in ("a", "b", "c")]
    assert cos[0] < cos[1] < cos[2], f"mean gradient cosine should rise with the shared suffix: {cos}"
    assert s["c"]["dpo"]["cosine_first"] > s["b"]["dpo"]["cosine_first"] > s["a"]["dpo"]["cosine_first"]
    long_dpo = s["c"]["dpo"]
    assert long_dpo["chosen_change"] < 0 < long_dpo["margin_change"], long_dpo
    assert s["a"]["dpo"]["chosen_change"] > 0  # no shared suffix: DPO raises the chosen log-prob
    assert long_dpo["case_counts"]["2"] > 0  # the monitor saw the both-fall case on the way
    long_norm = s["c"]["normalized"]
    assert all(d > 0 for d in long_norm["chosen_change_per_pair"]), long_norm["chosen_change_per_pair"]
    assert all(d < 0 for d in long_norm["rejected_change_per_pair"]), long_norm["rejected_change_per_pair"]
    assert "Paper's finding reproduced" in " ".join(log["verdict"])
    assert any(line.startswith("Normalised update on (c)") and "fixed" in line and "NOT" not in line
               for line in log["verdict"])


def test_predictions_forecast_the_next_step(reduced_run):
    """Plain SGD: the first-order prediction from the monitor's kept factors tracks the measured change."""
    _, log, _ = reduced_run
    for name, entry in log["sets"].items():
        for method in ("dpo", "normalized"):
            steps = entry[method]["steps"]
            assert log["summary"][name][method]["prediction_sign_agreement"] > 0.9
            first = steps[0]  # from the SFT start, small steps: within 20% of the measured change
            for key in ("chosen", "rejected"):
                pred = torch.tensor(first[f"predicted_{key}"])
                meas = torch.tensor(first[f"measured_{key}"])
                assert ((pred - meas).abs() <= 0.2 * meas.abs()).all(), (name, method, key, pred, meas)


def test_outputs_table_json_and_plots(reduced_run):
    result, log, printed = reduced_run
    assert "log p(w)" in printed and "dw pred" in printed and "plain SGD" in printed
    rows = [line for line in printed.splitlines() if line.split()[:2] in (["c", "dpo"], ["c", "normalized"])]
    assert len(rows) == 40
    assert {p.name for p in result.plots} == {"logprobs.png", "cosine.png", "token_matrix.png"}
    for p in result.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heat = log["heatmap"]
    assert heat["chosen_tokens"][0] == "positive" and heat["rejected_tokens"][0] == "negative"
    assert len(heat["matrix"]) == len(heat["chosen_tokens"]) and len(heat["matrix"][0]) == len(heat["rejected_tokens"])
    steps = log["sets"]["c"]["dpo"]["steps"]
    assert len(steps) == 20 and len(steps[0]["cosine"]) == 8 and steps[0]["measured_chosen"] is not None


def test_builtin_sets_differ_in_one_token_then_share_the_suffix():
    tok = build_tokenizer(sorted({w for s in builtin_sets() for ex in s.pairs for k in ex for w in ex[k].split()}))
    suffix = {}
    for s in builtin_sets():
        batch = encode_preference_batch(tok, s.pairs)
        b = len(s.pairs)
        labels = batch["labels"]
        for i in range(b):
            chosen, rejected = labels[i][labels[i] != -100], labels[b + i][labels[b + i] != -100]
            assert len(chosen) == len(rejected) and (chosen != rejected).sum() == 1 and chosen[0] != rejected[0]
        suffix[s.name] = len(chosen) - 1
    assert suffix == {"a": 0, "b": 5, "c": 15}


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def demo_cli(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "demo", ("entangle_fast.commands.demo", "the demo"))
    return cli.main


def test_missing_model_path_is_one_clear_error(demo_cli, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert demo_cli(["demo", "--model", str(missing), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err and str(missing) in err and "no such directory" in err


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "p", "chosen": "good"', "not valid JSON"),
    ('{"prompt": "p", "chosen": "good"}', "missing key 'rejected'"),
    ('{"prompt": "p", "chosen": "good", "rejected": 3}', "'rejected' must be a non-empty string"),
    ('["p", "good", "bad"]', "expected a JSON object"),
])
def test_malformed_jsonl_names_the_line(demo_cli, tmp_path, capsys, bad_line, message):
    data = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "review : the movie was", "chosen": "good", "rejected": "bad"})
    data.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    assert demo_cli(["demo", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and message in err, err
    with pytest.raises(ValueError, match="line 3"):
        load_pairs(data)


def test_missing_and_empty_data_files(demo_cli, tmp_path, capsys):
    assert demo_cli(["demo", "--data", str(tmp_path / "none.jsonl"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no preference pairs"):
        load_pairs(tmp_path / "empty.jsonl")


def test_user_model_and_data_run_end_to_end(demo_cli, tmp_path, capsys):
    """A local Hugging Face directory (a tiny Llama and the word tokenizer saved with save_pretrained) and a JSONL
    file go through the same pipeline."""
    pairs = [{"prompt": "review : the film was", "chosen": "great and fine", "rejected": "terrible and fine"},
             {"prompt": "review : the plot was", "chosen": "good", "rejected": "boring"}]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tok = build_tokenizer()
    model = tiny_model("llama", TinyConfig(vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2,
                                           num_kv_heads=1, intermediate_size=32))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = demo_cli(["demo", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out),
                     "--steps", "2", "--lr", "0.01", "--no-progress", "--no-plots"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    log = json.loads((out / "demo.json").read_text())
    assert list(log["sets"]) == ["data"] and log["sft_steps"] == 0
    assert len(log["sets"]["data"]["dpo"]["steps"]) == 2 and "prefs.jsonl" in printed
