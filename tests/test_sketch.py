"""Tests of sketch mode (entangle_fast/sketch.py): the sketches are what the formula says, their inner products are
unbiased estimates of the exact ghost values (`ghost_gram_reference`, float64), and the spread falls as 1/sqrt(k).

All statistical tests use fixed seeds, so they are deterministic; their bounds come from the sample itself.
"""

import math
import subprocess
import sys

import pytest
import torch

from entangle_fast.ghost import ghost_gram_reference
from entangle_fast.sketch import KroneckerSketch, layer_seed, sketch_inner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = (3, 5, 1)
PAIRS = [[0, 1], [1, 1], [2, 0], [0, 0]]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)


def _packed(lens, d_in, d_out, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    a = torch.randn(n, d_in, generator=gen, dtype=torch.float64).to(DEVICE)
    gamma = torch.randn(n, d_out, generator=gen, dtype=torch.float64).to(DEVICE)
    return a, gamma


def _pairs(pairs):
    return torch.tensor(pairs, dtype=torch.int64, device=DEVICE)


def _estimates(a, gamma, cu, p, k, seeds):
    """[len(seeds), P] sketch estimates, one independent pair of projections per seed (float64 sketches)."""
    d_in = a.shape[1] if a is not None else 1
    rows = []
    for s in seeds:
        sk = KroneckerSketch(d_in, gamma.shape[1], k, seed=s, device=DEVICE, dtype=torch.float64)
        rows.append(sketch_inner(sk.project(a, gamma, cu), p))
    return torch.stack(rows)


def test_layer_seed_is_stable_and_distinct():
    assert layer_seed(0, "model.layers.0.mlp.up_proj") == layer_seed(0, "model.layers.0.mlp.up_proj")
    assert layer_seed(0, "a") != layer_seed(0, "b") and layer_seed(0, "a") != layer_seed(1, "a")
    assert 0 <= layer_seed(2**40, "x" * 1000) < 2**63
    # Another interpreter (fresh hash salt) derives the same seed.
    code = "from entangle_fast.sketch import layer_seed; print(layer_seed(7, 'lm_head'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == layer_seed(7, "lm_head")


def test_same_seed_same_projections_any_dtype():
    one = KroneckerSketch(5, 4, 3, seed=11, device=DEVICE)
    two = KroneckerSketch(5, 4, 3, seed=11, device=DEVICE, dtype=torch.float64)
    assert one.p_in.shape == (3, 5) and one.p_out.shape == (3, 4) and one.p_in.dtype == torch.float32
    assert torch.equal(one.p_in, two.p_in.float()) and torch.equal(one.p_out, two.p_out.float())
    assert not torch.equal(one.p_in, KroneckerSketch(5, 4, 3, seed=12, device=DEVICE).p_in)


def test_project_matches_the_formula():
    a, gamma = _packed(LENS, 6, 5, seed=1)
    cu = _cu(LENS)
    sk = KroneckerSketch(6, 5, 4, seed=3, device=DEVICE, dtype=torch.float64)
    got_w, got_b = sk.project(a, gamma, cu), sk.project(None, gamma, cu)
    assert got_w.shape == (len(LENS), 4, 4) and got_b.shape == (len(LENS), 4)
    for r in range(len(LENS)):
        s0, s1 = int(cu[r]), int(cu[r + 1])
        grad_w = gamma[s0:s1].T @ a[s0:s1]  # the segment's weight gradient [d_out, d_in]
        torch.testing.assert_close(got_w[r], sk.p_out @ grad_w @ sk.p_in.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_b[r], sk.p_out @ gamma[s0:s1].sum(dim=0), rtol=1e-12, atol=1e-12)
    # Low-precision inputs are cast to the sketch's dtype.
    low = KroneckerSketch(6, 5, 4, seed=3, device=DEVICE).project(a.bfloat16(), gamma.bfloat16(), cu)
    assert low.dtype == torch.float32 and low.shape == got_w.shape


@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
def test_sketch_is_unbiased(bias):
    """The mean over 400 seeds lies within 4 standard errors (from the sample std) of the exact ghost value."""
    a, gamma = _packed(LENS, 6, 5, seed=2)
    a = None if bias else a
    cu, p = _cu(LENS), _pairs(PAIRS)
    exact = ghost_gram_reference(a, gamma, cu, p).values
    est = _estimates(a, gamma, cu, p, k=8, seeds=range(400))
    mean, sem = est.mean(dim=0), est.std(dim=0) / math.sqrt(est.shape[0])
    z = (mean - exact).abs() / sem
    assert bool((z < 4).all()), f"bias too large: |mean - exact| / standard error = {z.tolist()}"


def test_relative_error_falls_as_one_over_sqrt_k():
    """RMS error / (||G_i|| ||G_j||) over 200 seeds at k = 16, 64, 256: log-log slope about -1/2."""
    lens = (12, 9)
    a, gamma = _packed(lens, 32, 24, seed=4)
    cu, p = _cu(lens), _pairs([[0, 1], [0, 0], [1, 1]])
    exact = ghost_gram_reference(a, gamma, cu, p).values
    norms = ghost_gram_reference(a, gamma, cu, _pairs([[0, 0], [1, 1]])).values.sqrt()
    denom = norms[p[:, 0]] * norms[p[:, 1]]
    ks = [16, 64, 256]
    rms = []
    for k in ks:
        est = _estimates(a, gamma, cu, p, k=k, seeds=range(1000 * k, 1000 * k + 200))
        rms.append((((est - exact) / denom) ** 2).mean().sqrt().item())
    x = torch.log(torch.tensor(ks, dtype=torch.float64))
    y = torch.log(torch.tensor(rms, dtype=torch.float64))
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert -0.7 <= slope <= -0.3, f"slope {slope:.3f} of log RMS relative error vs log k (errors {rms})"


def test_bad_inputs():
    sk = KroneckerSketch(4, 3, 2, seed=0, device=DEVICE)
    a, gamma = _packed((2, 3), 4, 3, seed=5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        sk.project(a, gamma, _cu((2, 2)))
    with pytest.raises(ValueError, match="a must"):
        sk.project(a[:, :3], gamma, _cu((2, 3)))
    with pytest.raises(ValueError, match="gamma"):
        sk.project(a, gamma[:, :2], _cu((2, 3)))
    with pytest.raises(ValueError, match="seg_pairs"):
        sketch_inner(sk.project(a, gamma, _cu((2, 3))), _pairs([[0, 2]]))
    with pytest.raises(ValueError, match="k must"):
        KroneckerSketch(4, 3, 0, seed=0, device=DEVICE)
