"""Sketch mode: unbiased low-dimensional estimates of the per-segment gradient inner products (docs/math.md, section 5).

Per linear map y = a W^T + c, fixed Gaussian projections P_in [k, d_in] and P_out [k, d_out] with i.i.d. N(0, 1/k)
entries, so E[P^T P] = I. A segment r's weight gradient G_r = sum_tau gamma_tau a_tau^T [d_out, d_in] is sketched as

    S_r = P_out G_r P_in^T = sum_tau (P_out gamma_tau)(P_in a_tau)^T                [k, k]

and, P_in and P_out being independent, E<S_i, S_j>_F = tr(G_i^T E[P_out^T P_out] G_j E[P_in^T P_in]) = <G_i, G_j>_F:
an unbiased estimate of the ghost value of :func:`entangle_fast.ghost.ghost_gram`, with a relative spread of order
1/sqrt(k). The bias gradient sum_tau gamma_tau is sketched as P_out sum_tau gamma_tau [k], unbiased the same way.
Cost ~2k(d_in + d_out) per token for the projections plus 2k^2 per token for the outer products.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from entangle_fast._contract import check_segments


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the layer ``name`` under the run seed ``seed``, the same in every process and on every
    machine (a keyed BLAKE2b digest; Python's ``hash()`` is salted per process)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, key=str(int(seed)).encode("ascii")).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class KroneckerSketch:
    """The fixed projections of one linear map ``[d_out, d_in]`` and the sketches of its per-segment gradients.

    Args:
        d_in, d_out: the map's input and output widths. k: sketch size (the weight sketch is ``[k, k]``).
        seed: e.g. ``layer_seed(run_seed, layer_name)``. The matrices are drawn on the CPU in float64 from this seed
            and then moved, so they are the same on every device and in every dtype.
        device, dtype: where the projections live and the precision of the sketches (inputs are cast to it).

    Attributes:
        p_in ``[k, d_in]``, p_out ``[k, d_out]``: i.i.d. N(0, 1/k) entries, so E[P^T P] = I.
    """

    def __init__(self, d_in: int, d_out: int, k: int, *, seed: int, device, dtype: torch.dtype = torch.float32):
        for name, v in (("d_in", d_in), ("d_out", d_out), ("k", k)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.d_in, self.d_out, self.k, self.seed = d_in, d_out, k, int(seed)
        self.dtype = dtype
        gen = torch.Generator().manual_seed(self.seed)
        scale = 1.0 / math.sqrt(k)
        self.p_in = (torch.randn(k, d_in, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        self.p_out = (torch.randn(k, d_out, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    def project(self, a: Tensor | None, gamma: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Sketches of the per-segment gradients of the packed segments ``cu_seqlens`` (as in ``ghost_gram``).

        Args:
            a: ``[S, d_in]`` layer inputs, or None for the bias sketch. gamma: ``[S, d_out]`` output gradients.
            cu_seqlens: ``[n_seg + 1]`` int64 offsets, from 0 to S.

        Returns:
            ``[n_seg, k, k]`` weight sketches ``S_r = sum_tau (P_out gamma_tau)(P_in a_tau)^T``, or with ``a=None``
            ``[n_seg, k]`` bias sketches ``sum_tau P_out gamma_tau``; in the sketch's dtype.
        """
        if not isinstance(gamma, Tensor) or gamma.ndim != 2 or gamma.shape[1] != self.d_out:
            raise ValueError(f"gamma must have shape [S, d_out={self.d_out}], got {tuple(getattr(gamma, 'shape', ()))}")
        n_tok = gamma.shape[0]
        if a is not None and (not isinstance(a, Tensor) or tuple(a.shape) != (n_tok, self.d_in)):
            raise ValueError(f"a must have shape [S={n_tok}, d_in={self.d_in}], got {tuple(getattr(a, 'shape', ()))}")
        check_segments(cu_seqlens, n_tok, count="n_seg")
        n_seg = cu_seqlens.shape[0] - 1
        pg = gamma.to(self.dtype) @ self.p_out.T
        if a is None:
            seg = torch.repeat_interleave(torch.arange(n_seg, device=gamma.device), cu_seqlens[1:] - cu_seqlens[:-1])
            return torch.zeros(n_seg, self.k, dtype=self.dtype, device=gamma.device).index_add_(0, seg, pg)
        pa = a.to(self.dtype) @ self.p_in.T
        out = torch.empty(n_seg, self.k, self.k, dtype=self.dtype, device=gamma.device)
        # One [k, T_r] x [T_r, k] product per segment: memory S k, where padding to the longest segment or a
        # per-token outer product (S k^2) would not be.
        for r, (s0, s1) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            torch.matmul(pg[s0:s1].T, pa[s0:s1], out=out[r])
        return out


def sketch_inner(S: Tensor, seg_pairs: Tensor) -> Tensor:
    """``[P]`` Frobenius inner products ``<S_i, S_j>`` for the pairs ``seg_pairs [P, 2]`` of the sketches
    ``S [n_seg, ...]``: an unbiased estimate of the ghost values ``ghost_gram(...).values`` for the same pairs."""
    if not isinstance(seg_pairs, Tensor) or seg_pairs.dtype != torch.int64 or seg_pairs.ndim != 2 \
            or seg_pairs.shape[1] != 2:
        raise ValueError(f"seg_pairs must be an int64 tensor [P, 2], got {getattr(seg_pairs, 'dtype', None)} "
                         f"{tuple(getattr(seg_pairs, 'shape', ()))}")
    if seg_pairs.numel() and (int(seg_pairs.min()) < 0 or int(seg_pairs.max()) >= S.shape[0]):
        raise ValueError(f"seg_pairs must index the {S.shape[0]} sketches, got values in "
                         f"[{int(seg_pairs.min())}, {int(seg_pairs.max())}]")
    return (S[seg_pairs[:, 0]] * S[seg_pairs[:, 1]]).flatten(1).sum(dim=1)


class SketchCache:
    """One :class:`KroneckerSketch` per layer, made on first use and seeded by the layer's name
    (:func:`layer_seed`): the monitor and the profiler draw the same projections for the same layer."""

    def __init__(self, seed: int, k: int):
        self.seed, self.k = int(seed), int(k)
        self._sketches: dict[str, KroneckerSketch] = {}

    def get(self, name: str, d_in: int, d_out: int, *, device, dtype) -> KroneckerSketch:
        sketch = self._sketches.get(name)
        if sketch is None:
            sketch = self._sketches[name] = KroneckerSketch(d_in, d_out, self.k, seed=layer_seed(self.seed, name),
                                                            device=device, dtype=dtype)
        return sketch
