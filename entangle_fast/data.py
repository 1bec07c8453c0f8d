"""Preference data: the built-in pairs, the JSON-lines loader, the one pair encoder and the default row pairing.

A pair is ``{"prompt", "chosen", "rejected"}``, each a string or a list of ``{"role", "content"}`` messages (TRL's
conversational format). Batches follow TRL's concatenated layout: ``[2B, T]`` rows, the B chosen rows first
(rows 0..B-1), then the B rejected rows (rows B..2B-1); :func:`default_pairs` is that pairing as ``[B, 2]`` row
indices.

The BOS/EOS rule of :func:`encode_pairs` (the only encoder; the demo, the profiler, the CLI and the tests use it):

- without a chat template, a row is ``[bos] prompt response [eos]``: ``<bos>`` when the tokenizer has one, the texts
  encoded without special tokens, ``<eos>`` when ``eos=True`` (the default) and the tokenizer has one. Message lists
  are joined by newlines;
- with a chat template (``tokenizer.chat_template``), the prompt is rendered with ``add_generation_prompt=True`` and
  the response is the rest of the rendered conversation (the template's own end-of-turn tokens, no extra ``<eos>``);
  strings count as one user turn and one assistant turn.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

PAIR_KEYS = ("prompt", "chosen", "rejected")

# Built-in preference pairs: the response differs in one sentiment word, with and without a shared suffix.
BUILTIN_PAIRS = [
    {"prompt": "review : the movie was", "chosen": "positive", "rejected": "negative"},
    {"prompt": "review : the book was", "chosen": "good and the ending was fine", "rejected": "bad and the ending was fine"},
    {"prompt": "overall sentiment of my review :", "chosen": "positive because the acting was great and the music was very good",
     "rejected": "negative because the acting was great and the music was very good"},
]


# ----------------------------------------------------------------------------------------------------------------------
# Row pairing
# ----------------------------------------------------------------------------------------------------------------------


def default_pairs(rows: int, device=None) -> Tensor:
    """``[B, 2]`` int64 ``(chosen row, rejected row)`` of TRL's layout: row i with row B + i, for ``rows = 2B``.

    Raises:
        ValueError: an odd number of rows.
    """
    if rows % 2:
        raise ValueError(f"the default pairing (chosen rows 0..B-1 with rejected rows B..2B-1) needs an even number of "
                         f"rows (2B rows), got {rows} rows: pass pairs= explicitly")
    b = rows // 2
    return torch.stack([torch.arange(b, device=device), torch.arange(b, 2 * b, device=device)], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _filled(value) -> bool:
    return bool(value.strip()) if isinstance(value, str) else bool(value)


def check_pair(pair, where: str) -> dict:
    """The pair's three fields (other keys dropped), or a ValueError whose message starts with ``where``.

    ``prompt`` is a string or a message list (it may be empty); ``chosen`` and ``rejected`` are non-empty ones.
    """
    if not isinstance(pair, dict):
        raise ValueError(f"{where}: expected a JSON object with prompt, chosen and rejected, got "
                         f"{type(pair).__name__}")
    missing = [k for k in PAIR_KEYS if k not in pair]
    if missing:
        raise ValueError(f"{where}: missing {missing}: missing key {missing[0]!r} (a pair needs 'prompt', 'chosen' "
                         "and 'rejected')")
    for key in PAIR_KEYS:
        value = pair[key]
        if not (isinstance(value, str) or _is_messages(value)):
            kind = "" if key == "prompt" else f"; {key!r} must be a non-empty string or message list"
            raise ValueError(f"{where}: {key!r} must be a string or a list of {{'role', 'content'}} messages, got "
                             f"{type(value).__name__}{kind}")
        if key != "prompt" and not _filled(value):
            raise ValueError(f"{where}: {key!r} is empty; {key!r} must be a non-empty string or message list")
    return {k: pair[k] for k in PAIR_KEYS}


def load_pairs(path: str | os.PathLike) -> list[dict]:
    """Preference pairs from a JSON-lines file: one object per line with ``prompt``, ``chosen`` and ``rejected``,
    each a string or a list of ``{"role", "content"}`` messages. Blank lines are skipped; other keys are ignored.

    Raises:
        FileNotFoundError: no such file (the message names it).
        ValueError: a bad line (the message names the file and the line number), or a file with no pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r}: no such file")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}) on line {lineno}") from None
            try:
                pairs.append(check_pair(obj, where))
            except ValueError as err:
                raise ValueError(f"{err} (line {lineno})") from None
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file (expected one JSON object per line)")
    return pairs


def pair_text(value) -> str:
    """A field as plain text: a string as it is, a message list as its contents joined by newlines."""
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def pair_hash(pair: dict) -> str:
    """A short digest of a pair's text, to check that resumed records belong to the same data."""
    blob = json.dumps({k: pair[k] for k in PAIR_KEYS}, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------------


def _messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _encode_row(tokenizer, pair: dict, side: str, eos: bool) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of one side of a pair, by the module's BOS/EOS rule."""
    if getattr(tokenizer, "chat_template", None):
        prompt_msgs = _messages(pair["prompt"], "user")
        prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt_msgs + _messages(pair[side], "assistant"), tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of prompt + response; "
                             "pass plain strings or a template that does")
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
        response = tokenizer.encode(full[len(prompt_text):], add_special_tokens=False)
        return prompt, response
    bos = getattr(tokenizer, "bos_token_id", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    prompt = ([bos] if bos is not None else []) + tokenizer.encode(pair_text(pair["prompt"]), add_special_tokens=False)
    response = tokenizer.encode(pair_text(pair[side]), add_special_tokens=False)
    if response and eos and eos_id is not None:
        response = response + [eos_id]
    return prompt, response


def encode_pairs(tokenizer, pairs: list[dict], *, eos: bool = True, max_length: int | None = None,
                 device=None) -> dict:
    """``[2B, T]`` ``input_ids``, ``attention_mask`` and ``labels`` of ``B`` pairs: chosen rows 0..B-1, rejected rows
    B..2B-1 (TRL's concatenated layout), right padding, labels -100 on the prompt and padding.

    Rows follow the module's BOS/EOS rule (module docstring). ``eos=False`` scores each response as given, without
    ``<eos>`` (the demo: its single-token set then differs in exactly one token). ``max_length`` cuts each row after
    that many tokens (labels with it). ``device``: where the tensors go (default CPU).

    Raises:
        ValueError: a response that encodes to no token, or a prompt that encodes to none with no ``<bos>`` (nothing
            would score the first response token).
    """
    from entangle_fast.preference import IGNORE_INDEX, collate_rows

    if not pairs:
        raise ValueError("encode_pairs: no pairs")
    rows, labels = [], []
    for side in ("chosen", "rejected"):
        for i, pair in enumerate(pairs):
            prompt, response = _encode_row(tokenizer, pair, side, eos)
            if not prompt:
                raise ValueError(f"pair {i}: the prompt encodes to no token and the tokenizer has no BOS token: "
                                 "nothing scores the first response token")
            if not response:
                raise ValueError(f"pair {i}: the {side} response {pair[side]!r} encodes to no token")
            ids = prompt + response
            lab = [IGNORE_INDEX] * len(prompt) + response
            if max_length:
                ids, lab = ids[:max_length], lab[:max_length]
            rows.append(ids)
            labels.append(lab)
    pad = getattr(tokenizer, "pad_token_id", None)
    batch = collate_rows(rows, labels, pad if pad is not None else 0)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def encode_pair(tokenizer, pair: dict, *, device=None) -> dict:
    """``[2, T]`` one pair (chosen row, rejected row): :func:`encode_pairs` of ``[pair]``."""
    return encode_pairs(tokenizer, [pair], device=device)


def decode_tokens(tokenizer, ids) -> list[str]:
    """Each id decoded on its own (what a heat-map axis shows)."""
    return [tokenizer.decode([int(i)]) for i in ids]
