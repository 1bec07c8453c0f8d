"""The profiler's outputs: one JSON record per pair (JSON lines), per-pair matrices and PNGs, and one HTML report.

Files under the output folder:

- ``profile.jsonl``: one JSON object per finished pair, appended, flushed and fsync'ed as each pair finishes, so an
  interrupted run loses nothing; :func:`read_records` drops a torn last line. Keys: :data:`RECORD_FIELDS`.
- ``matrices/pair-NNNNNN.npz``: the pair's matrices at full precision (``token_matrix``, ``output_layer_token_matrix``,
  ``position_attribution``, token ids and positions).
- ``images/pair-NNNNNN-*.png``: heat-maps with decoded tokens on both axes and the per-layer bar chart.
- ``report.html``: summary table across pairs, top entangling token pairs, per-layer bar chart, every pair's
  heat-maps; images referenced by relative path (or embedded as base64 data URIs with ``embed_images=True``).

Record values are JSON-safe: non-finite floats are written as ``null``.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np

RECORDS_NAME = "profile.jsonl"
HTML_NAME = "report.html"
# Matrices up to this many tokens a side are written into the JSON record too (they are always in the .npz).
INLINE_MAX = 128
TOP_PAIRS = 10

# key -> JSON type(s) of every record (``None`` allowed where noted by NoneType).
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "index": (int,),
    "run_id": (str,),
    "pair_hash": (str,),
    "prompt": (str, list),
    "chosen": (str, list),
    "rejected": (str, list),
    "chosen_tokens": (list,),
    "rejected_tokens": (list,),
    "chosen_positions": (list,),
    "rejected_positions": (list,),
    "chosen_logp": (float, type(None)),
    "rejected_logp": (float, type(None)),
    "chosen_token_logps": (list,),
    "rejected_token_logps": (list,),
    "inner": (float, type(None)),
    "chosen_sq_norm": (float, type(None)),
    "rejected_sq_norm": (float, type(None)),
    "cosine": (float, type(None)),
    "case": (int,),
    "case_name": (str,),
    "chosen_falls": (bool,),
    "rejected_rises": (bool,),
    "token_matrix_sum": (float, type(None)),
    "mode": (str,),
    "sketched": (list,),
    "output_layer": (dict,),
    "per_module": (dict,),
    "per_layer": (dict,),
    "top_pairs": (list,),
    "bottom_pairs": (list,),
    "token_matrix": (list, type(None)),
    "output_layer_token_matrix": (list, type(None)),
    "position_attribution": (list, type(None)),
    "matrices": (str,),
    "images": (dict,),
    "token_backwards": (int,),
    "seconds": (float,),
}


def _num(x) -> float | None:
    """A JSON-safe float (None for NaN/inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _array(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().to("cpu")
        t = t.double() if t.is_floating_point() else t
        return t.numpy()
    return np.asarray(t)


def _matrix_json(m) -> list | None:
    a = _array(m)
    if a.ndim != 2 or max(a.shape, default=0) > INLINE_MAX:
        return None
    return [[_num(v) for v in row] for row in a]


def _cosine(inner, nw, nl) -> float | None:
    inner, nw, nl = (_num(v) for v in (inner, nw, nl))
    if inner is None or nw is None or nl is None or nw <= 0 or nl <= 0:
        return None
    return inner / math.sqrt(nw * nl)


def layer_of(module: str) -> str:
    """The layer a module belongs to: its name up to the first numeric part (``model.layers.3.mlp.up_proj`` ->
    ``model.layers.3``); cross terms of a shared matrix (``"a x b"``) and un-numbered modules stand alone."""
    if " x " in module:
        return module
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module


def per_layer(per_module: dict[str, dict]) -> "OrderedDict[str, dict]":
    """Sum the per-module ``inner``/``chosen_sq_norm``/``rejected_sq_norm`` by :func:`layer_of`, in module order,
    and recompute each layer's cosine. (Squared norms add because layers hold disjoint parameters; the cross terms
    of a tied matrix are their own entry.)"""
    out: OrderedDict[str, dict] = OrderedDict()
    for name, vals in per_module.items():
        acc = out.setdefault(layer_of(name), {"inner": 0.0, "chosen_sq_norm": 0.0, "rejected_sq_norm": 0.0})
        for key in acc:
            v = vals.get(key)
            acc[key] = None if v is None or acc[key] is None else acc[key] + v
    for acc in out.values():
        acc["cosine"] = _cosine(acc["inner"], acc["chosen_sq_norm"], acc["rejected_sq_norm"]) \
            if None not in acc.values() else None
    return out


def _extreme_pairs(matrix: np.ndarray, chosen: list[str], rejected: list[str], count: int, largest: bool):
    flat = matrix.reshape(-1)
    finite = np.isfinite(flat)
    if not finite.any():
        return []
    order = np.argsort(np.where(finite, flat, -np.inf if largest else np.inf))
    order = order[::-1] if largest else order
    out = []
    for k in order[:count]:
        t, s = divmod(int(k), matrix.shape[1])
        value = float(matrix[t, s])
        if (largest and value <= 0) or (not largest and value >= 0):
            break
        out.append({"chosen_index": t, "rejected_index": s, "chosen_token": chosen[t], "rejected_token": rejected[s],
                    "value": value})
    return out


def pair_files(out_dir: Path, index: int) -> dict[str, Path]:
    """Where the files of pair ``index`` go (absolute), keyed as in the record's ``images`` plus ``matrices``."""
    stem = f"pair-{index:06d}"
    return {
        "token_matrix": out_dir / "images" / f"{stem}-token.png",
        "output_layer": out_dir / "images" / f"{stem}-output-layer.png",
        "position_attribution": out_dir / "images" / f"{stem}-positions.png",
        "layers": out_dir / "images" / f"{stem}-layers.png",
        "matrices": out_dir / "matrices" / f"{stem}.npz",
    }


def write_pair(out_dir, index: int, pair: dict, prof, *, chosen_tokens: list[str], rejected_tokens: list[str],
               chosen_inputs: list[str], rejected_inputs: list[str], run_id: str, pair_hash: str,
               seconds: float) -> dict:
    """Write pair ``index``'s ``.npz`` and PNGs and return its JSON record (not yet appended).

    Args:
        prof: :class:`entangle_fast.profile.PairProfile`. chosen_tokens / rejected_tokens: decoded response tokens
            (K's axes); chosen_inputs / rejected_inputs: decoded input tokens of the rows (the position axes).
    """
    from entangle_fast.plots import layer_bar_chart, position_heatmap, token_heatmap

    out_dir = Path(out_dir)
    files = pair_files(out_dir, index)
    token = prof.token
    k = _array(token.matrix)
    head = token.output_layer
    k_head = _array(head["token_matrix"]) if head is not None else np.zeros_like(k)
    attribution = _array(prof.position_attribution)
    files["matrices"].parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        files["matrices"], token_matrix=k, output_layer_token_matrix=k_head, position_attribution=attribution,
        chosen_ids=_array(prof.chosen_ids), rejected_ids=_array(prof.rejected_ids),
        chosen_positions=_array(token.chosen_positions), rejected_positions=_array(token.rejected_positions),
        chosen_input_ids=_array(prof.chosen_input_ids), rejected_input_ids=_array(prof.rejected_input_ids),
    )
    kind = "sketch estimate" if token.mode == "sketch" else "exact"
    token_heatmap(k, chosen_tokens, rejected_tokens, title=f"pair {index}: full-model token matrix K[t, s] ({kind})",
                  path=files["token_matrix"], cbar_label="<grad l_t (chosen), grad l_s (rejected)>")
    token_heatmap(k_head, chosen_tokens, rejected_tokens, title=f"pair {index}: output layer only",
                  path=files["output_layer"], cbar_label="<grad_W l_t, grad_W l_s>")
    position_heatmap(attribution, chosen_inputs, rejected_inputs,
                     title=f"pair {index}: position attribution of I (where layers act; not K)",
                     path=files["position_attribution"], cbar_label="share of I")

    per_module = OrderedDict()
    rank = {name: i for i, name in enumerate(token.paths)}
    for name, (inner, nw, nl) in sorted(prof.per_module.items(), key=lambda kv: rank.get(kv[0], len(rank))):
        per_module[name] = {"inner": _num(inner), "chosen_sq_norm": _num(nw), "rejected_sq_norm": _num(nl),
                            "cosine": _cosine(inner, nw, nl),
                            "token_matrix_sum": _num(token.per_module[name]) if name in token.per_module else None,
                            "path": token.paths.get(name, "")}
    layers = per_layer(per_module)
    layer_bar_chart({name: (v["inner"] if v["inner"] is not None else float("nan")) for name, v in layers.items()},
                    title=f"pair {index}: I = <grad s_w, grad s_l> by layer", path=files["layers"],
                    xlabel="inner product (log-prob gradients)")
    case_names = {0: "undefined", 1: "ideal", 2: "both fall", 3: "both rise"}
    images = {key: str(path.relative_to(out_dir).as_posix()) for key, path in files.items() if key != "matrices"}
    head_stats = {}
    if head is not None:
        head_stats = {"inner": _num(head["inner"]), "chosen_sq_norm": _num(head["chosen_sq_norm"]),
                      "rejected_sq_norm": _num(head["rejected_sq_norm"]), "cosine": _num(head["cosine"])}
    return {
        "index": index,
        "run_id": run_id,
        "pair_hash": pair_hash,
        "prompt": pair["prompt"],
        "chosen": pair["chosen"],
        "rejected": pair["rejected"],
        "chosen_tokens": list(chosen_tokens),
        "rejected_tokens": list(rejected_tokens),
        "chosen_positions": [int(v) for v in _array(token.chosen_positions)],
        "rejected_positions": [int(v) for v in _array(token.rejected_positions)],
        "chosen_logp": _num(prof.chosen_logp),
        "rejected_logp": _num(prof.rejected_logp),
        "chosen_token_logps": [_num(v) for v in _array(prof.chosen_token_logps)],
        "rejected_token_logps": [_num(v) for v in _array(prof.rejected_token_logps)],
        "inner": _num(prof.inner),
        "chosen_sq_norm": _num(prof.chosen_sq_norm),
        "rejected_sq_norm": _num(prof.rejected_sq_norm),
        "cosine": _num(prof.cosine),
        "case": int(prof.case),
        "case_name": case_names.get(int(prof.case), "undefined"),
        "chosen_falls": bool(prof.chosen_falls),
        "rejected_rises": bool(prof.rejected_rises),
        "token_matrix_sum": _num(k.sum()),
        "mode": token.mode,
        "sketched": list(token.sketched),
        "output_layer": head_stats,
        "per_module": per_module,
        "per_layer": layers,
        "top_pairs": _extreme_pairs(k, chosen_tokens, rejected_tokens, TOP_PAIRS, largest=True),
        "bottom_pairs": _extreme_pairs(k, chosen_tokens, rejected_tokens, TOP_PAIRS // 2, largest=False),
        "token_matrix": _matrix_json(k),
        "output_layer_token_matrix": _matrix_json(k_head),
        "position_attribution": _matrix_json(attribution),
        "matrices": files["matrices"].relative_to(out_dir).as_posix(),
        "images": images,
        "token_backwards": int(token.token_backwards),
        "seconds": float(seconds),
    }


# ----------------------------------------------------------------------------------------------------------------------
# JSON lines
# ----------------------------------------------------------------------------------------------------------------------


def append_record(path, record: dict) -> None:
    """Append one record as a JSON line, flushed and fsync'ed before returning."""
    line = json.dumps(record, allow_nan=False, ensure_ascii=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path, *, repair: bool = False) -> list[dict]:
    """The complete records of a JSON lines file, in file order.

    A last line without its newline (the run was killed while writing it) is dropped; with ``repair=True`` it is also
    cut from the file so appending can resume cleanly. Any other unparsable line raises ValueError naming it.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if repair and len(complete) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = []
    for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not a JSON record ({err.msg})") from err
        if not isinstance(record, dict) or "index" not in record:
            raise ValueError(f"{path}:{lineno}: a profile record must be a JSON object with an 'index'")
        records.append(record)
    return records


def check_record(record: dict) -> None:
    """Raise ValueError when a record misses a key of :data:`RECORD_FIELDS` or holds a value of the wrong type."""
    for key, types in RECORD_FIELDS.items():
        if key not in record:
            raise ValueError(f"record {record.get('index')} has no {key!r}")
        value = record[key]
        if isinstance(value, bool) and bool not in types:
            raise ValueError(f"record {record.get('index')}: {key!r} is a bool, expected {types}")
        if not isinstance(value, types) and not (float in types and isinstance(value, int)
                                                  and not isinstance(value, bool)):
            raise ValueError(f"record {record.get('index')}: {key!r} is {type(value).__name__}, expected {types}")


# ----------------------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.text { text-align: left; max-width: 28em; overflow-wrap: anywhere; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
.case1 { color: #1a7f37; } .case2, .case3 { color: #b42318; font-weight: 600; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: 0.8em; color: #555; }
code { background: #f6f6f6; padding: 0 3px; }
"""


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "&ndash;"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _text(value) -> str:
    if isinstance(value, list):  # conversational data: messages
        value = " | ".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                           for m in value)
    value = str(value)
    return html.escape(value if len(value) <= 300 else value[:297] + "...")


def _img(out_dir: Path, rel: str, alt: str, embed: bool) -> str:
    if embed:
        data = base64.b64encode((out_dir / rel).read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    else:
        src = html.escape(rel, quote=True)
    return f'<img src="{src}" alt="{html.escape(alt, quote=True)}" loading="lazy">'


def aggregate_layers(records: Iterable[dict]) -> "OrderedDict[str, float]":
    """Mean over pairs of each layer's inner product (pairs where it is undefined are left out of that mean)."""
    sums: OrderedDict[str, list[float]] = OrderedDict()
    for record in records:
        for name, vals in record["per_layer"].items():
            if vals.get("inner") is not None:
                sums.setdefault(name, []).append(vals["inner"])
    return OrderedDict((name, sum(v) / len(v)) for name, v in sums.items())


def write_html(out_dir, records: list[dict], meta: dict | None = None, *, embed_images: bool = False) -> Path:
    """Write ``report.html`` for ``records`` (sorted by index) into ``out_dir`` and return its path.

    Args:
        meta: run facts shown at the top (model, data, device, dtype, ...), string values.
        embed_images: embed every PNG as a base64 data URI (one file to mail around) instead of linking it.
    """
    from entangle_fast.plots import layer_bar_chart

    out_dir = Path(out_dir)
    records = sorted(records, key=lambda r: r["index"])
    meta = dict(meta or {})
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>entangle-fast profile</title>"
             f"<style>{_CSS}</style></head><body>", "<h1>Gradient entanglement profile</h1>"]
    facts = [("pairs", str(len(records)))] + [(k, str(v)) for k, v in meta.items()]
    parts.append("<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td class='text'>{html.escape(v)}</td></tr>"
                                     for k, v in facts) + "</table>")
    parts.append(
        "<p class='note'>For each pair, <b>I</b> = &lt;grad s<sub>w</sub>, grad s<sub>l</sub>&gt; over the tracked "
        "parameters, <b>N<sub>w</sub></b>, <b>N<sub>l</sub></b> the squared gradient norms of the chosen and rejected "
        "sequence log-probs, cos = I / sqrt(N<sub>w</sub> N<sub>l</sub>). For a DPO-like loss one SGD step makes, to "
        "first order, the chosen log-prob fall when I &gt; N<sub>w</sub> and the rejected log-prob rise when "
        "I &gt; N<sub>l</sub> (the paper's cases: 1 ideal, 2 both fall, 3 both rise). Under Adam this is an "
        "indicator of direction, not a forecast. The token matrix K[t, s] = &lt;grad l<sub>t</sub>, grad "
        "l<sub>s</sub>&gt; splits I over pairs of response tokens (red: the two tokens' gradients align, which "
        "entangles them; blue: they oppose). The position attribution splits I over the positions where layers act; "
        "it is a different object from K.</p>")
    parts.append("<h2>Summary</h2><table><tr><th>pair</th><th>T<sub>w</sub></th><th>T<sub>l</sub></th>"
                 "<th>log p(chosen)</th><th>log p(rejected)</th><th>I</th><th>N<sub>w</sub></th><th>N<sub>l</sub></th>"
                 "<th>cos</th><th>case</th><th>chosen falls</th><th>rejected rises</th><th>output-layer cos</th>"
                 "<th>top token pair</th><th>mode</th><th>seconds</th></tr>")
    for r in records:
        top = r["top_pairs"][0] if r["top_pairs"] else None
        top_txt = (f"{html.escape(top['chosen_token'])} / {html.escape(top['rejected_token'])} "
                   f"({_fmt(top['value'], 3)})") if top else "&ndash;"
        parts.append(
            f"<tr><td><a href='#pair-{r['index']}'>{r['index']}</a></td><td>{len(r['chosen_tokens'])}</td>"
            f"<td>{len(r['rejected_tokens'])}</td><td>{_fmt(r['chosen_logp'])}</td><td>{_fmt(r['rejected_logp'])}</td>"
            f"<td>{_fmt(r['inner'])}</td><td>{_fmt(r['chosen_sq_norm'])}</td><td>{_fmt(r['rejected_sq_norm'])}</td>"
            f"<td>{_fmt(r['cosine'], 3)}</td><td class='case{r['case']}'>{r['case']} ({html.escape(r['case_name'])})"
            f"</td><td>{_fmt(r['chosen_falls'])}</td><td>{_fmt(r['rejected_rises'])}</td>"
            f"<td>{_fmt(r['output_layer'].get('cosine'), 3)}</td><td class='text'>{top_txt}</td>"
            f"<td>{html.escape(r['mode'])}</td><td>{_fmt(r['seconds'], 3)}</td></tr>")
    parts.append("</table>")

    tops = sorted(((r["index"], p) for r in records for p in r["top_pairs"]), key=lambda x: -x[1]["value"])[:20]
    lows = sorted(((r["index"], p) for r in records for p in r["bottom_pairs"]), key=lambda x: x[1]["value"])[:10]
    for title, rows in (("Top entangling token pairs (largest K[t, s])", tops),
                        ("Most contrastive token pairs (most negative K[t, s])", lows)):
        parts.append(f"<h2>{title}</h2>")
        if not rows:
            parts.append("<p class='note'>none</p>")
            continue
        parts.append("<table><tr><th>pair</th><th>chosen token (t)</th><th>rejected token (s)</th><th>K[t, s]</th>"
                     "</tr>")
        for idx, p in rows:
            parts.append(f"<tr><td><a href='#pair-{idx}'>{idx}</a></td><td class='text'>"
                         f"{html.escape(p['chosen_token'])} ({p['chosen_index']})</td><td class='text'>"
                         f"{html.escape(p['rejected_token'])} ({p['rejected_index']})</td><td>{_fmt(p['value'])}</td>"
                         "</tr>")
        parts.append("</table>")

    parts.append("<h2>Per layer</h2>")
    layers = aggregate_layers(records)
    if layers:
        rel = "images/layers-mean.png"
        layer_bar_chart(layers, title=f"mean over {len(records)} pair(s) of I by layer", path=out_dir / rel,
                        xlabel="inner product (log-prob gradients)")
        parts.append(f"<figure>{_img(out_dir, rel, 'mean inner product by layer', embed_images)}"
                     "<figcaption>I by layer, averaged over pairs</figcaption></figure>")

    parts.append("<h2>Pairs</h2>")
    captions = {"token_matrix": "full-model token matrix K", "output_layer": "output layer only",
                "position_attribution": "position attribution (not K)", "layers": "I by layer"}
    for r in records:
        parts.append(f"<h3 id='pair-{r['index']}'>Pair {r['index']}</h3><table>"
                     f"<tr><th>prompt</th><td class='text'>{_text(r['prompt'])}</td></tr>"
                     f"<tr><th>chosen</th><td class='text'>{_text(r['chosen'])}</td></tr>"
                     f"<tr><th>rejected</th><td class='text'>{_text(r['rejected'])}</td></tr>"
                     f"<tr><th>I, N<sub>w</sub>, N<sub>l</sub>, cos</th><td class='text'>{_fmt(r['inner'])}, "
                     f"{_fmt(r['chosen_sq_norm'])}, {_fmt(r['rejected_sq_norm'])}, {_fmt(r['cosine'], 3)}</td></tr>"
                     f"<tr><th>sum of K</th><td class='text'>{_fmt(r['token_matrix_sum'])} ({html.escape(r['mode'])})"
                     "</td></tr></table>")
        for key, caption in captions.items():
            rel = r["images"].get(key)
            if rel and (out_dir / rel).exists():
                image = _img(out_dir, rel, f"pair {r['index']}: {caption}", embed_images)
                parts.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    path = out_dir / HTML_NAME
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
