"""Data-parallel monitoring on CPU: 2 processes (gloo) under DDP and FSDP2 against one process holding every pair.

One subprocess runs this file as a script; it spawns the 2 ranks, which train the same float64 tiny model on their own
half of 4 pairs (rank r holds pairs 2r and 2r + 1) through
:func:`~entangle_fast.integrations.distributed.wrapped_preference_logprobs`, under the monitor, and save what they saw.
The test process runs the same steps on all 4 pairs at once and compares: per-pair statistics, the all-reduced
``entangle/`` means, the coefficients (a rank's batch mean has 1/2 where the single process has 1/4) and the averaged
gradients.

Scenarios (hinge loss, a pair's margin met makes its coefficients zero and its statistics NaN):
    one_zero: pair 3 (rank 1) at zero coefficient: rank 0 has 2 valid pairs, rank 1 one.
    rank_all_zero: pairs 2 and 3 at zero coefficient: rank 1 has no valid pair at all.
Neither may hang, and the means must weight each valid pair of the world equally.

FSDP2 (``fully_shard``) runs on CPU with gloo in torch 2.13 (all-gather and reduce-scatter work). The monitor, however,
recognises the output head's fused-op record by the data pointer of the head weight it saw at construction, which under
FSDP2 is the sharded DTensor, not the unsharded weight the forward uses; so the head's terms and the coefficients are
lost (docs/integrations.md). What is tested under FSDP2 is therefore the monitor with the head excluded and the
coefficients taken from ``watch()``; the full-model comparison is an expected failure until the monitor looks the head
up at backward time.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLD = 2
LR = 0.1
BETA = 0.1
TIMEOUT_S = 150  # hard limit on the subprocess and everything it spawned
SCENARIOS = {"one_zero": (0.0, 0.0, 0.0, 20.0), "rank_all_zero": (0.0, 0.0, 20.0, 20.0)}
CONFIGS = {"ddp": ("full",), "fsdp2": ("full", "no_head")}
EXTRA_PAIR = {"prompt": "what felt too boring ?", "chosen": "the ending", "rejected": "the music was"}


def _pairs():
    from entangle_fast.models import BUILTIN_PAIRS

    return list(BUILTIN_PAIRS) + [EXTRA_PAIR]


def _hook_state(model) -> tuple:
    return tuple((len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                  len(m._backward_pre_hooks), id(m.__dict__.get("forward"))) for m in model.modules())


def _step(wrapped, inner, batch, offsets, config: str) -> dict:
    """One monitored hinge step; reference log-probs = policy log-probs shifted by ``offsets`` on the chosen side."""
    from entangle_fast.integrations.distributed import entanglement_metrics, rank, wrapped_preference_logprobs
    from entangle_fast.losses import preference_loss
    from entangle_fast.monitor import EntanglementMonitor
    from entangle_fast.token_stats import active_listeners

    for p in inner.parameters():
        p.grad = None
    exclude = ["lm_head"] if config == "no_head" else ()
    mon = EntanglementMonitor(inner, exclude=exclude)
    hooks = _hook_state(inner)
    with mon:
        out = wrapped_preference_logprobs(wrapped, batch)
        shift = torch.tensor(offsets, dtype=out.chosen_logps.dtype)
        loss = preference_loss("hinge", out.chosen_logps, out.rejected_logps,
                               ref_chosen_logps=out.chosen_logps.detach() - shift,
                               ref_rejected_logps=out.rejected_logps.detach(), beta=BETA).losses.mean()
        if config == "no_head":
            mon.watch(out.chosen_logps, out.rejected_logps)
        loss.backward()
    clean = _hook_state(inner) == hooks and not active_listeners()
    stats, error = None, None
    try:
        stats = mon.stats
    except Exception as err:  # noqa: BLE001 - recorded, judged by the test
        error = repr(err)
    # The reduction always runs (stats None where the monitor failed), so a failing rank cannot hang the others.
    metrics = entanglement_metrics(stats, lr=LR)
    rank0_only = entanglement_metrics(stats if rank() == 0 else None, lr=LR)
    grads = {}
    for name, p in inner.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    per_pair = None
    if stats is not None:
        per_pair = {k: getattr(stats, k).detach().clone() for k in
                    ("inner", "chosen_sq_norm", "rejected_sq_norm", "cosine", "a_w", "a_l", "case")}
    return {"metrics": metrics, "rank0_only": rank0_only, "grads": grads, "per_pair": per_pair, "error": error,
            "clean": clean, "loss": loss.item()}


def _wrap(model, kind: str):
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _rank_main(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    from entangle_fast.models import build_tokenizer, encode_pairs, tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        tok = build_tokenizer()
        mine = slice(2 * rank, 2 * rank + 2)
        batch = encode_pairs(tok, _pairs()[mine])
        results = {}
        for kind, configs in CONFIGS.items():
            model = tiny_model("llama", dtype=torch.float64).train()
            wrapped = _wrap(model, kind)
            for config in configs:
                for name, offsets in SCENARIOS.items():
                    results[(kind, config, name)] = _step(wrapped, model, batch, offsets[mine], config)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------------
# The test process


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2-rank job once (both wrappers, every scenario); returns ``[rank0 results, rank1 results]``."""
    outdir = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(outdir), "--port", str(_free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the subprocess's own session: it and the ranks it spawned
        output, _ = proc.communicate()
        pytest.fail(f"2-rank job did not finish within {TIMEOUT_S} s (a hung collective?):\n"
                    f"{output.decode(errors='replace')[-4000:]}")
    assert proc.returncode == 0, f"2-rank job failed:\n{output.decode(errors='replace')[-4000:]}"
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The same steps in one process on all 4 pairs (no process group)."""
    from entangle_fast.models import build_tokenizer, encode_pairs, tiny_model

    batch = encode_pairs(build_tokenizer(), _pairs())
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: tiny models, and no intra-op pool stalls on a busy machine
    for config in ("full", "no_head"):
        model = tiny_model("llama", dtype=torch.float64).train()
        for name, offsets in SCENARIOS.items():
            results[(config, name)] = _step(model, model, batch, offsets, config)
    torch.set_num_threads(threads)
    return results


def _assert_close(actual, expected, what):
    # Both runs are float64 and compute the same sums; only the padding width (and so the blocking of the matmuls)
    # differs, which moves results by a few float64 ulps.
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _compare(ranks, single, kind, config, scenario):
    ref = single[(config, scenario)]
    assert ref["error"] is None, ref["error"]
    got = [r[(kind, config, scenario)] for r in ranks]
    for r, res in enumerate(got):
        assert res["error"] is None, f"rank {r}: {res['error']}"
        assert res["clean"], f"rank {r}: hooks or listeners left behind"
        mine = slice(2 * r, 2 * r + 2)
        for key in ("inner", "chosen_sq_norm", "rejected_sq_norm", "cosine"):
            _assert_close(res["per_pair"][key], ref["per_pair"][key][mine], f"rank {r} {key}")
        torch.testing.assert_close(res["per_pair"]["case"], ref["per_pair"]["case"][mine])
        for key in ("a_w", "a_l"):  # the rank's loss is a mean over 2 pairs, the single process's over 4
            _assert_close(res["per_pair"][key], WORLD * ref["per_pair"][key][mine], f"rank {r} {key}")
        assert res["metrics"].keys() == ref["metrics"].keys()
        for key, value in ref["metrics"].items():
            assert math.isclose(res["metrics"][key], value, rel_tol=1e-9, abs_tol=1e-12) or (
                math.isnan(value) and math.isnan(res["metrics"][key])), (r, key, res["metrics"][key], value)
        for name, g in ref["grads"].items():
            _assert_close(res["grads"][name], g, f"rank {r} grad {name}")
    return got, ref


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ddp_statistics_equal_single_process(ranks, single, scenario):
    got, ref = _compare(ranks, single, "ddp", "full", scenario)
    zero = ref["per_pair"]["a_l"] == 0
    assert int(zero.sum()) == (1 if scenario == "one_zero" else 2)
    # The NaN pairs are left out of the means, and the means weight every valid pair of the world equally.
    expected = ref["per_pair"]["cosine"][~zero].mean().item()
    assert math.isclose(got[0]["metrics"]["entangle/cosine"], expected, rel_tol=1e-9)
    assert got[0]["metrics"]["entangle/zero_coefficient"] == zero.double().mean().item()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rank_without_statistics_joins_the_reduction(ranks, single, scenario):
    """Rank 1 contributing nothing (stats=None) still lets the collective finish: the means are rank 0's pairs'."""
    ref = single[("full", scenario)]["per_pair"]
    for r in range(WORLD):
        metrics = ranks[r][("ddp", "full", scenario)]["rank0_only"]
        valid = ref["a_l"][:2] != 0
        assert math.isclose(metrics["entangle/inner"], ref["inner"][:2][valid].mean().item(), rel_tol=1e-9)
        assert metrics["entangle/case_undefined"] == 1.0 - valid.double().mean().item()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fsdp2_statistics_equal_single_process_without_head(ranks, single, scenario):
    _compare(ranks, single, "fsdp2", "no_head", scenario)


def test_fsdp2_full_model_statistics(ranks, single):
    _compare(ranks, single, "fsdp2", "full", "one_zero")


# ----------------------------------------------------------------------------------------------------------------------
# The reduction helpers on one process


def _fake_stats(inner, nw, nl, a_w, a_l):
    from entangle_fast.monitor import EntanglementStats
    from entangle_fast.monitor.stats import classify

    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    inner, nw, nl, a_w, a_l = map(t, (inner, nw, nl, a_w, a_l))
    case, falls, rises = classify(inner, nw, nl, a_w, a_l)
    return EntanglementStats(inner=inner, chosen_sq_norm=nw, rejected_sq_norm=nl, cosine=inner / (nw * nl).sqrt(),
                             a_w=a_w, a_l=a_l, case=case, chosen_falls=falls, rejected_rises=rises,
                             zero_coefficient=(a_w == 0) | (a_l == 0), per_module={},
                             pairs=torch.tensor([[0, 3], [1, 4], [2, 5]]))


def test_local_sums_exclude_nan_pairs_and_count_cases_over_all_pairs():
    from entangle_fast.integrations.distributed import METRICS, entanglement_metrics, local_sums

    nan = float("nan")
    stats = _fake_stats([1.0, nan, 5.0], [2.0, nan, 4.0], [3.0, nan, 6.0], [-0.5, 0.0, -0.5], [0.5, 0.0, 0.5])
    sums = local_sums(stats, lr=0.2)
    row = {name: sums[i] for i, name in enumerate(METRICS)}
    assert row["inner"].tolist() == [6.0, 2.0]
    assert row["zero_coefficient"].tolist() == [1.0, 3.0]
    # pair 0: I < min(N_w, N_l): ideal; pair 2: N_w <= I <= N_l: both fall; pair 1: undefined
    assert [row[f"case_{c}"][0].item() for c in ("ideal", "both_fall", "both_rise", "undefined")] == [1, 1, 0, 1]
    metrics = entanglement_metrics(stats, lr=0.2)
    d_w, _ = stats.predicted_delta(0.2)
    assert metrics["entangle/predicted_delta_chosen"] == pytest.approx(d_w.mean().item())  # zero-coefficient -> 0
    assert metrics["entangle/cosine"] == pytest.approx((1 / math.sqrt(6) + 5 / math.sqrt(24)) / 2)
    halved = entanglement_metrics(stats, lr=0.2, grad_divisor=2.0)
    assert halved["entangle/predicted_delta_chosen"] == pytest.approx(metrics["entangle/predicted_delta_chosen"] / 2)


def test_no_statistics_gives_nan_means():
    from entangle_fast.integrations.distributed import METRICS, entanglement_metrics

    metrics = entanglement_metrics(None, lr=0.1)
    assert list(metrics) == [f"entangle/{m}" for m in METRICS]
    assert all(math.isnan(v) for v in metrics.values())


def test_wrapped_call_restores_forward_on_error():
    from entangle_fast.integrations.distributed import wrapped_preference_logprobs
    from entangle_fast.models import build_tokenizer, encode_pairs, tiny_model

    model = tiny_model("llama")
    batch = encode_pairs(build_tokenizer(), _pairs()[:2])
    bad = dict(batch, labels=batch["labels"].clone())
    bad["labels"][0, -1] = 10_000  # out of the vocabulary: the fused op refuses it inside the swapped forward
    with pytest.raises(ValueError, match="labels must lie"):
        wrapped_preference_logprobs(model, bad)
    assert "forward" not in model.__dict__
    out = wrapped_preference_logprobs(model, batch)
    assert out.chosen_logps.shape == (2,)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, required=True)
    cli = parser.parse_args()
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(WORLD, cli.port, cli.out), nprocs=WORLD, join=True)
