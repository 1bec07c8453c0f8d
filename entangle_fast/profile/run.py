"""One pair profiled (:func:`profile_pair`) and a data set walked into a report (:func:`run_profile`)."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import torch
from torch import nn

from entangle_fast.data import decode_tokens, encode_pair, pair_hash
from entangle_fast.monitor.coverage import resolve_params
from entangle_fast.profile.engine import DEFAULT_MEMORY_BUDGET, DEFAULT_SKETCH_DIM, _EvalMode, _pair_rows, per_token_matrix
from entangle_fast.profile.results import PairProfile, ProfileRun


def _monitored(model: nn.Module, batch: dict, params, exclude):
    """Log-probs and the monitor's statistics of the pair from one backward of L = s_l - s_w (a_w = -1, a_l = 1)."""
    from entangle_fast.monitor import EntanglementMonitor
    from entangle_fast.preference import preference_logprobs

    coverage_params = resolve_params(model, params, exclude)
    with _EvalMode(model), torch.enable_grad():
        with EntanglementMonitor(model, params=params, exclude=exclude, position_attribution=True) as mon:
            out = preference_logprobs(model, batch)
            loss = (out.rejected_logps - out.chosen_logps).sum()
            # autograd.grad, not backward(): the profiler leaves the parameters' .grad alone.
            torch.autograd.grad(loss, coverage_params, allow_unused=True)
    return out, mon.stats


def profile_pair(model: nn.Module, batch: dict, *, params=None, exclude=(), mode: str = "auto",
                 sketch_dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 chunk_tokens: int | None = None) -> PairProfile:
    """Profile one preference pair: :func:`per_token_matrix` plus log-probs, the monitor's exact per-module
    statistics and position attribution, and the paper's case. Arguments as in :func:`per_token_matrix`."""
    token = per_token_matrix(model, batch, params=params, exclude=exclude, mode=mode, sketch_dim=sketch_dim,
                             seed=seed, memory_budget=memory_budget, chunk_tokens=chunk_tokens)
    rows, (input_ids, mask, labels) = _pair_rows(batch)
    out, stats = _monitored(model, batch, params, exclude)
    keep = out.token_mask
    lw, ll = out.chosen_token_logps[0][keep[0]].detach(), out.rejected_token_logps[0][keep[1]].detach()
    pw, pl = (len(r.ids) for r in rows)
    attribution = stats.position_attribution[0]
    attribution = attribution[rows[0].offset: rows[0].offset + pw, rows[1].offset: rows[1].offset + pl]
    return PairProfile(
        token=token,
        chosen_token_logps=lw,
        rejected_token_logps=ll,
        chosen_logp=out.chosen_logps[0].detach(),
        rejected_logp=out.rejected_logps[0].detach(),
        inner=stats.inner[0],
        chosen_sq_norm=stats.chosen_sq_norm[0],
        rejected_sq_norm=stats.rejected_sq_norm[0],
        cosine=stats.cosine[0],
        case=int(stats.case[0]),
        chosen_falls=bool(stats.chosen_falls[0]),
        rejected_rises=bool(stats.rejected_rises[0]),
        per_module={k: tuple(t[0] for t in v) for k, v in stats.per_module.items()},
        position_attribution=attribution,
        chosen_input_ids=rows[0].ids,
        rejected_input_ids=rows[1].ids,
        chosen_ids=rows[0].y,
        rejected_ids=rows[1].y,
    )


def run_profile(model: nn.Module, tokenizer, pairs: list[dict], out_dir, *, resume: bool = False,
                max_pairs: int | None = None, progress: bool = True, mode: str = "auto",
                sketch_dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                chunk_tokens: int | None = None, embed_images: bool = False, meta: dict | None = None,
                params=None, exclude=()) -> ProfileRun:
    """Profile ``pairs`` one by one and write the report into ``out_dir`` (see :mod:`entangle_fast.report`).

    Each finished pair's record is appended to ``profile.jsonl`` (flushed and fsync'ed) before the next pair starts.
    ``resume=True`` keeps the records already there and profiles only the missing pairs (their text must match);
    without it, an existing non-empty ``profile.jsonl`` is an error rather than silently overwritten. The HTML report
    is written at the end, also when the run is interrupted (covering the pairs finished so far).

    Args:
        max_pairs: profile at most the first ``max_pairs`` pairs of ``pairs``.
        meta: facts shown at the top of the HTML (model, data, ...).
        Other arguments: as in :func:`profile_pair`.
    """
    from tqdm.auto import tqdm

    from entangle_fast import report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / report.RECORDS_NAME
    if max_pairs is not None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
        pairs = pairs[:max_pairs]
    hashes = [pair_hash(p) for p in pairs]
    done: dict[int, dict] = {}
    if records_path.exists() and records_path.stat().st_size:
        if not resume:
            raise ValueError(f"{records_path} already holds records: pass --resume (resume=True) to continue that "
                             "run, or choose another output folder")
        for record in report.read_records(records_path, repair=True):
            idx = record["index"]
            if idx < len(hashes) and record.get("pair_hash") != hashes[idx]:
                raise ValueError(f"{records_path}: the record of pair {idx} was made from different data (its text "
                                 "differs); resume with the same --data, or choose another output folder")
            done[idx] = record
    todo = [i for i in range(len(pairs)) if i not in done]
    run_id = uuid.uuid4().hex[:12]
    device = next(model.parameters()).device
    computed = []
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), disable=not progress, desc="profile", unit="pair",
               dynamic_ncols=True)
    try:
        for idx in todo:
            start = time.perf_counter()
            batch = encode_pair(tokenizer, pairs[idx], device=device)
            prof = profile_pair(model, batch, params=params, exclude=exclude, mode=mode, sketch_dim=sketch_dim,
                                seed=seed, memory_budget=memory_budget, chunk_tokens=chunk_tokens)
            record = report.write_pair(
                out_dir, idx, pairs[idx], prof,
                chosen_tokens=decode_tokens(tokenizer, prof.chosen_ids),
                rejected_tokens=decode_tokens(tokenizer, prof.rejected_ids),
                chosen_inputs=decode_tokens(tokenizer, prof.chosen_input_ids),
                rejected_inputs=decode_tokens(tokenizer, prof.rejected_input_ids),
                run_id=run_id, pair_hash=hashes[idx], seconds=time.perf_counter() - start)
            report.append_record(records_path, record)
            done[idx] = record
            computed.append(idx)
            bar.set_postfix(I=f"{record['inner']:.3g}" if record["inner"] is not None else "nan",
                            case=record["case"], refresh=False)
            bar.update(1)
    finally:
        bar.close()
        records = [done[i] for i in sorted(done)]
        html_path = report.write_html(out_dir, records, meta, embed_images=embed_images) if records else None
    return ProfileRun(out_dir, records_path, html_path, records, computed, sorted(set(done) - set(computed)))
