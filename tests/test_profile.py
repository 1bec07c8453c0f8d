"""The per-token profiler: token matrices against explicit per-token gradients (float64), the report files, resume,
and the error paths of `entangle-fast profile`.

Ground truth: ``flat_gradients_reference`` on each response token's log-prob (one autograd backward per token,
flattened gradients of every parameter), K = G_w G_l^T. Tiny Llama (untied, RMSNorm) and GPT-2 (Conv1D, LayerNorm,
tied wte/lm_head with cross terms) in float64, SDPA attention, so 1e-9 relative is the bar.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import entangle_fast.profile as profile_mod
from entangle_fast import cli, output_layer_token_stats
from entangle_fast.models import BUILTIN_PAIRS, TinyConfig, build_tokenizer, encode_pairs, tiny_model
from entangle_fast.profile import (
    encode_pair,
    load_model,
    load_pairs,
    per_token_matrix,
    per_token_matrix_baseline,
    profile_pair,
)
from entangle_fast.reference import flat_gradients_reference, sequence_logprobs_reference
from entangle_fast.report import RECORD_FIELDS, check_record, read_records
from helpers import assert_exact64, left_padded

TINY = TinyConfig(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=24)


@pytest.fixture(autouse=True)
def _profile_command(monkeypatch):
    """Until cli.py lists the subcommand, register it here (a no-op once it does)."""
    monkeypatch.setitem(cli.COMMANDS, "profile", ("entangle_fast.commands.profile", "per-token gradient profiler"))


def pair_batch(index: int = 2, padding: str = "right") -> dict:
    """Built-in pair ``index`` as a ``[2, T]`` batch (its chosen and rejected rows), padded on one side."""
    full = encode_pairs(build_tokenizer(), BUILTIN_PAIRS)
    b = len(BUILTIN_PAIRS)
    batch = {k: v[[index, b + index]].clone() for k, v in full.items()}
    return left_padded(batch) if padding == "left" else batch


def reference_matrix(model, batch) -> torch.Tensor:
    """K = G_w G_l^T from one flattened-gradient backward per response token (through the plain logits)."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    token = sequence_logprobs_reference(logits, batch["labels"])
    keep = batch["labels"][:, 1:] != -100
    params = [p for p in model.parameters() if p.requires_grad]
    gw = flat_gradients_reference(token[0][keep[0]], params)
    gl = flat_gradients_reference(token[1][keep[1]], params)
    return gw @ gl.T


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_token_matrix_exact_against_flat_gradients(arch, padding):
    model = tiny_model(arch, TINY, dtype=torch.float64)
    batch = pair_batch(2 if padding == "right" else 1, padding)
    want = reference_matrix(model, batch)
    got = per_token_matrix(model, batch, module_matrices=True)
    assert got.matrix.shape == want.shape and got.mode == "exact" and not got.sketched
    assert_exact64(got.matrix, want, name=f"{arch} K")
    assert_exact64(sum(got.per_module.values()), want.sum(), name="per-module totals")
    assert_exact64(sum(got.module_matrices.values()), want, name="per-module matrices")
    if arch == "gpt2":  # tied embeddings: the cross term is there and not negligible
        assert got.paths["transformer.wte x lm_head"] == "cross"
        assert got.module_matrices["transformer.wte x lm_head"].abs().max() > 1e-6 * want.abs().max()
    assert_exact64(per_token_matrix_baseline(model, batch), want, name="baseline")


def test_token_matrix_chunks_blocks_and_explicit_path(monkeypatch):
    """One token per batched backward, a memory budget that forces one rejected token per block (the chosen side
    recomputed per block), and the explicit per-token-gradient path for every linear layer: the same matrix."""
    model = tiny_model("gpt2", TINY, dtype=torch.float64)
    batch = pair_batch(1)
    want = reference_matrix(model, batch)
    small = per_token_matrix(model, batch, chunk_tokens=1, memory_budget=1)
    tw, tl = want.shape
    assert small.token_backwards == tl + tw * tl
    assert_exact64(small.matrix, want, name="one-token chunks and blocks")
    monkeypatch.setattr(profile_mod.engine, "LINEAR_PATH", "explicit")
    explicit = per_token_matrix(model, batch, chunk_tokens=3)
    assert "explicit" in explicit.paths.values()
    assert_exact64(explicit.matrix, want, name="explicit path")


def test_baseline_streams_in_blocks():
    model = tiny_model("llama", TINY, dtype=torch.float64)
    batch = pair_batch(1)
    n_bytes = sum(p.numel() for p in model.parameters()) * 8
    assert_exact64(per_token_matrix_baseline(model, batch, memory_budget=2 * n_bytes), reference_matrix(model, batch),
                   name="baseline, two chosen gradients per block")


def test_profile_pair_agrees_with_monitor_and_output_layer():
    model = tiny_model("gpt2", TINY, dtype=torch.float64)
    batch = pair_batch(2)
    prof = profile_pair(model, batch, mode="exact")
    k = prof.token.matrix
    assert_exact64(k.sum(), prof.inner, name="sum K = monitor's I")
    for name, total in prof.token.per_module.items():  # each module's share of K sums to its sentence-level I
        assert_exact64(total, prof.per_module[name][0], name=f"{name} total")
    assert_exact64(prof.position_attribution.sum(), prof.inner, name="position attribution total")
    hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    stats = output_layer_token_stats(hidden[:, :-1], model.lm_head.weight, batch["labels"][:, 1:])
    assert_exact64(prof.token.output_layer["token_matrix"], stats.pair(0)["token_matrix"], name="output layer")
    assert prof.case in (1, 2, 3)
    assert prof.chosen_falls == bool(prof.inner > prof.chosen_sq_norm)
    assert prof.rejected_rises == bool(prof.inner > prof.rejected_sq_norm)
    assert prof.chosen_token_logps.shape == (k.shape[0],) and prof.rejected_token_logps.shape == (k.shape[1],)


def test_sketch_mode_is_unbiased_and_exact_elsewhere():
    """Sketched matrix parameters: the mean over seeds is within 4 standard errors of the exact total; every module
    that is not sketched (norms, the head) is exact."""
    model = tiny_model("llama", TINY, dtype=torch.float64)
    batch = pair_batch(1)
    exact = per_token_matrix(model, batch)
    runs = [per_token_matrix(model, batch, mode="sketch", sketch_dim=8, seed=s) for s in range(24)]
    sketched = set(runs[0].sketched)
    assert sketched and "lm_head" not in sketched and all(r.mode == "sketch" for r in runs)
    for name in exact.per_module:
        if name not in sketched:
            assert_exact64(runs[0].per_module[name], exact.per_module[name], name=name)
    want = sum(exact.per_module[n] for n in sketched)
    estimates = torch.stack([sum(r.per_module[n] for n in sketched) for r in runs])
    stderr = estimates.std() / len(runs) ** 0.5
    assert (estimates.mean() - want).abs() <= 4 * stderr, (estimates.mean().item(), want.item(), stderr.item())


def test_auto_mode_switches_to_sketch_for_long_responses(monkeypatch):
    model = tiny_model("llama", TINY)
    batch = pair_batch(2)
    monkeypatch.setattr(profile_mod.engine, "AUTO_SKETCH_TOKENS", 4)
    assert per_token_matrix(model, batch, mode="auto").mode == "sketch"
    monkeypatch.setattr(profile_mod.engine, "AUTO_SKETCH_TOKENS", 256)
    assert per_token_matrix(model, batch, mode="auto").mode == "exact"


def test_token_heatmap_signature_and_size(tmp_path):
    import numpy as np
    from matplotlib import image as mpimg

    from entangle_fast.plots import token_heatmap

    words = [f" w{i}" for i in range(32)]
    path = token_heatmap(np.random.default_rng(0).normal(size=(32, 32)), words, words[::-1], title="K",
                         path=tmp_path / "sub" / "k.png", cbar_label="inner product")
    assert path == tmp_path / "sub" / "k.png"
    height, width = mpimg.imread(path).shape[:2]
    assert width >= 32 * 20 and height >= 32 * 20  # at least ~20 px per token cell with labels
    small = token_heatmap(torch.randn(2, 3), ["a", "$x$"], ["b", "\n", ""], title="t", path=tmp_path / "s.png")
    assert small.exists()


# ----------------------------------------------------------------------------------------------------------------------
# The command line and its files
# ----------------------------------------------------------------------------------------------------------------------


def run_cli(args, capsys):
    code = cli.main(["profile", "--no-progress", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def png_size(path: Path) -> tuple[int, int]:
    from matplotlib import image as mpimg

    h, w = mpimg.imread(path).shape[:2]
    return w, h


def check_report(out: Path, n_pairs: int) -> list[dict]:
    records = read_records(out / "profile.jsonl")
    assert [r["index"] for r in records] == list(range(n_pairs))
    lines = (out / "profile.jsonl").read_text().splitlines()
    assert len(lines) == n_pairs and all(json.loads(line) for line in lines)
    for r in records:
        check_record(r)
        assert set(RECORD_FIELDS) <= set(r)
        tw, tl = len(r["chosen_tokens"]), len(r["rejected_tokens"])
        assert len(r["token_matrix"]) == tw and len(r["token_matrix"][0]) == tl
        assert abs(r["token_matrix_sum"] - r["inner"]) <= 1e-4 * abs(r["inner"])  # float32 model: K sums to I
        assert r["case"] in (1, 2, 3) and r["top_pairs"] and r["per_layer"]
        for key, rel in r["images"].items():
            w, h = png_size(out / rel)
            assert w >= 200 and h >= 150, (key, w, h)
        with __import__("numpy").load(out / r["matrices"]) as npz:
            assert npz["token_matrix"].shape == (tw, tl)
    html = (out / "report.html").read_text()
    import re

    sources = re.findall(r'<img src="([^"]+)"', html)
    referenced = {s for s in sources if not s.startswith("data:")}
    images = {rel for r in records for rel in r["images"].values()} | {"images/layers-mean.png"}
    assert images <= referenced, images - referenced
    assert all((out / s).is_file() for s in referenced)
    assert "Summary" in html and "Top entangling token pairs" in html and "Per layer" in html
    return records


def test_cli_builtin_run_writes_report(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["--arch", "gpt2", "--out", out], capsys)
    assert code == 0, stderr
    assert "profiled 3 pair(s)" in stdout and "report.html" in stdout
    check_report(out, 3)


def test_report_embeds_images_and_renders_in_a_browser(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, stderr = run_cli(["--out", out, "--max-pairs", "1", "--embed-images"], capsys)
    assert code == 0, stderr
    html = (out / "report.html").read_text()
    import base64
    import re

    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == 5 and all(base64.b64decode(e)[:8] == b"\x89PNG\r\n\x1a\n" for e in embedded)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("requires_chromium: no chromium or chromium-browser on PATH to render the report headless")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1400,2000", (out / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    assert png_size(shot)[0] >= 1000


def test_resume_after_a_killed_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["--out", out, "--max-pairs", "1"], capsys)
    assert code == 0, stderr
    first = read_records(out / "profile.jsonl")
    assert [r["index"] for r in first] == [0]
    # Killed while writing the second record: a torn last line.
    with open(out / "profile.jsonl", "a") as f:
        f.write('{"index": 1, "run_id": "torn", "prompt": "rev')
    code, _, stderr = run_cli(["--out", out], capsys)  # without --resume: refuses to overwrite
    assert code == 2 and "--resume" in stderr
    code, stdout, stderr = run_cli(["--out", out, "--resume"], capsys)
    assert code == 0, stderr
    assert "profiled 2 pair(s), 1 already done" in stdout
    records = check_report(out, 3)
    assert records[0] == first[0]  # untouched
    assert records[1]["run_id"] == records[2]["run_id"] != first[0]["run_id"]


def test_bad_data_lines_are_named(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "review : the movie was", "chosen": "good", "rejected": "bad"})
    for body, message in ((f"{good}\n{{not json\n", "pairs.jsonl:2: not valid JSON"),
                          (f"{good}\n\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n",
                           "pairs.jsonl:3: missing ['rejected']"),
                          (json.dumps({"prompt": "x", "chosen": 3, "rejected": "z"}) + "\n",
                           "pairs.jsonl:1: 'chosen' must be a string"),
                          ("\n", "no preference pairs")):
        data.write_text(body)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_pairs(data)
        code, _, stderr = run_cli(["--data", data, "--out", tmp_path / "o"], capsys)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")


def test_missing_model_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    code, _, stderr = run_cli(["--model", missing, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no-such-model" in stderr and "does not exist" in stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = run_cli(["--model", empty, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "cannot load" in stderr and "empty" in stderr


def test_local_hf_model_with_chat_template(tmp_path, capsys):
    """A saved model folder loads through AutoModelForCausalLM/AutoTokenizer; the chat template renders the prompt."""
    tokenizer = build_tokenizer(["user", "assistant"])
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                               "{% if add_generation_prompt %}assistant : {% endif %}")
    model = tiny_model("llama", TinyConfig(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                                           num_kv_heads=1, intermediate_size=24))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, tok = load_model(folder, device="cpu")
    batch = encode_pair(tok, {"prompt": "how was the movie ?", "chosen": "good", "rejected": "bad"})
    prompt = tok.decode(batch["input_ids"][0][batch["labels"][0] == -100])
    assert prompt.startswith("user : how was the movie ?") and prompt.rstrip().endswith("assistant :")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "how was the movie ?"}],
                                "chosen": [{"role": "assistant", "content": "good"}],
                                "rejected": [{"role": "assistant", "content": "bad"}]}) + "\n")
    code, _, stderr = run_cli(["--model", folder, "--data", data, "--out", tmp_path / "o", "--device", "cpu"],
                              capsys)
    assert code == 0, stderr
    (record,) = read_records(tmp_path / "o" / "profile.jsonl")
    assert record["chosen_tokens"][0] == "good" and record["rejected_tokens"][0] == "bad"
    # The record holds what the API computes for the same model and pair (float32 values, exact in JSON).
    want = per_token_matrix(loaded, batch).matrix
    assert torch.equal(torch.tensor(record["token_matrix"], dtype=torch.float64).to(want.dtype), want)
