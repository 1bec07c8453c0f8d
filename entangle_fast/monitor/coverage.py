"""Which parameters the monitor tracks, which module uses each one, and which reducer covers each module.

A tracked parameter is covered when every module that owns it is claimed by a reducer of the registry
(:mod:`entangle_fast.monitor.kinds`): linear maps, Conv1D, embeddings, position-wise modules, and the generic per-row
path for any other module that acts row by row. Modules that mix rows (batch statistics) are refused:
:class:`UncoveredParametersError` lists their parameters by name, unless the caller excluded them. A parameter owned
by several modules (GPT-2's tied ``wte``/``lm_head``) forms one unit with them; its cross terms are added in
:mod:`entangle_fast.monitor.reductions`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from entangle_fast.monitor.kinds import Reducer, reducer_for
from entangle_fast.monitor.kinds.positionwise import register_positionwise  # noqa: F401  (public re-export)


class UncoveredParametersError(ValueError):
    """Trainable parameters whose per-sequence gradients the monitor cannot rebuild exactly; lists them by name."""


def module_kind(module: nn.Module) -> tuple[str | None, str]:
    """``(kind, reason)``: the reduction kind of a module owning tracked parameters, or ``(None, why not)``."""
    reducer, why = reducer_for(module)
    return (reducer.kind if reducer is not None else None), why


@dataclass
class Entry:
    """One module owning tracked parameters: ``tracked`` are the attribute names of its tracked direct parameters."""

    name: str
    module: nn.Module
    reducer: Reducer
    tracked: tuple[str, ...]

    @property
    def kind(self) -> str:
        return self.reducer.kind


@dataclass
class Coverage:
    """The resolved parameter set and its owners.

    entries: modules owning tracked parameters. units: groups of entry indices sharing a tracked parameter (most
    units have one entry). shared: ``id(param) -> [(entry index, attribute)]`` for parameters owned by several
    entries. names: ``id(param) -> name`` of every tracked parameter. head: index of the entry of the output
    embedding module, when it owns tracked parameters.
    """

    entries: list[Entry]
    units: list[list[int]]
    shared: dict[int, list[tuple[int, str]]]
    names: dict[int, str]
    params: list[nn.Parameter]
    head: int | None = None
    unit_of: dict[int, int] = field(default_factory=dict)


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _excluded_ids(model: nn.Module, exclude: Iterable) -> set[int]:
    named_modules = dict(model.named_modules())
    named_params = dict(model.named_parameters())
    ids: set[int] = set()
    for item in exclude:
        if isinstance(item, nn.Parameter):
            ids.add(id(item))
        elif isinstance(item, nn.Module):
            ids.update(id(p) for p in item.parameters())
        elif isinstance(item, str):
            if item in named_params:
                ids.add(id(named_params[item]))
            elif item in named_modules:
                ids.update(id(p) for p in named_modules[item].parameters())
            else:
                raise ValueError(f"exclude names {item!r}, which is neither a parameter nor a module of the model")
        else:
            raise TypeError(f"exclude takes parameters, modules or their names; got {type(item).__name__}")
    return ids


def resolve_params(model: nn.Module, params, exclude: Iterable = ()) -> list[nn.Parameter]:
    """The tracked parameters: ``None`` (every parameter with requires_grad), ``"lm_head"`` (the output embedding's
    parameters) or an iterable of parameters; minus ``exclude``."""
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
    elif isinstance(params, str):
        if params != "lm_head":
            raise ValueError(f"params must be None, 'lm_head' or an iterable of parameters; got {params!r}")
        head = _output_embedding(model)
        if head is None:
            raise ValueError(f"params='lm_head': {type(model).__name__} has no output embedding")
        chosen = [p for p in head.parameters(recurse=False) if p.requires_grad]
        if not chosen:
            raise ValueError("params='lm_head': the output embedding has no parameter with requires_grad")
    else:
        chosen, seen = [], set()
        owned = {id(p) for p in model.parameters()}
        for p in params:
            if not isinstance(p, nn.Parameter) or id(p) not in owned:
                raise ValueError("params must be parameters of the monitored model")
            if not p.requires_grad:
                raise ValueError("params contains a parameter with requires_grad=False: it receives no gradient")
            if id(p) not in seen:
                seen.add(id(p))
                chosen.append(p)
    dropped = _excluded_ids(model, exclude)
    return [p for p in chosen if id(p) not in dropped]


def build_coverage(model: nn.Module, params=None, exclude: Iterable = ()) -> Coverage:
    """Resolve the parameter set, classify every module owning a tracked parameter, and group shared parameters.

    Raises:
        UncoveredParametersError: tracked parameters owned by modules of no covered kind, by name, with the reason.
    """
    tracked = resolve_params(model, params, exclude)
    tracked_ids = {id(p) for p in tracked}
    names = {id(p): n for n, p in model.named_parameters() if id(p) in tracked_ids}
    head_module = _output_embedding(model)
    entries: list[Entry] = []
    owners: dict[int, list[tuple[int, str]]] = {}
    uncovered: list[str] = []
    for mname, module in model.named_modules():
        attrs = tuple(a for a, p in module._parameters.items() if p is not None and id(p) in tracked_ids)
        if not attrs:
            continue
        reducer, why = reducer_for(module)
        if reducer is None:
            uncovered += [f"{mname + '.' if mname else ''}{a} ({why})" for a in attrs]
            continue
        idx = len(entries)
        entries.append(Entry(mname, module, reducer, attrs))
        for a in attrs:
            owners.setdefault(id(module._parameters[a]), []).append((idx, a))
    if uncovered:
        raise UncoveredParametersError(
            "EntanglementMonitor cannot cover these trainable parameters exactly:\n  " + "\n  ".join(uncovered)
            + "\nPass them (or their modules) in exclude= to leave them out of the statistics."
        )
    shared = {pid: users for pid, users in owners.items() if len(users) > 1}
    for pid, users in shared.items():
        kinds = {entries[i].kind for i, _ in users}
        if any(entries[i].reducer.shares is None for i, _ in users):
            raise UncoveredParametersError(
                f"parameter {names[pid]} is shared by modules of kinds {sorted(kinds)}; the monitor adds cross terms "
                "between Linear, Conv1D and Embedding uses only. Exclude it to leave it out."
            )
    # Union-find over entries that share a parameter.
    parent = list(range(len(entries)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for users in shared.values():
        for i, _ in users[1:]:
            parent[find(i)] = find(users[0][0])
    groups: dict[int, list[int]] = {}
    for i in range(len(entries)):
        groups.setdefault(find(i), []).append(i)
    units = list(groups.values())
    unit_of = {i: u for u, members in enumerate(units) for i in members}
    head = next((i for i, e in enumerate(entries) if e.module is head_module), None)
    return Coverage(entries, units, shared, names, tracked, head, unit_of)
