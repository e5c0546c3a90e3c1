"""Sweep grids: presets, TOML specs and CLI flags -> validated cells with deterministic ids.

A spec has `fixed` run-config keys, `grid` keys with a list of values (their cartesian
product gives the cells), `variants` (optional: a list of key sets chosen together, so a
sweep can run chosen combinations such as (gossip-mode, topology) pairs instead of their
full product; the grid is multiplied by the variants) and `nodes`. A key may be scoped to
one strategy, `gossip:topology`, so strategy-specific knobs neither reach nor multiply the
cells of other strategies; a variant reduced to the keys a strategy uses may repeat for it,
and repeats are run once. Every cell is checked by `RunConfig.from_run_config` before
anything runs.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Any

from flower_app.config import ConfigError, RunConfig
from flower_app.results import format_eps
from sim.analysis.names import CORE

SCOPE = ":"
# The sweep sets these: <out>/runs, the cell id, and the cell list of its Flower runs.
RESERVED = ("results-dir", "run-name", "cells")
STRATEGIES: tuple[str, ...] = RunConfig.__dataclass_fields__["strategy"].metadata["choices"]
RUN_CONFIG_KEYS = tuple(sorted(f.name.replace("_", "-") for f in fields(RunConfig)))
# As many nodes as plain `flwr run .` simulates (scripts/setup's .flwr/config.toml; a test
# keeps the two equal), so a sweep cell and `flwr run .` of the same keys are the same run.
DEFAULT_NODES = 20


class SweepError(ValueError):
    """A sweep that cannot run: one line naming the key or value."""


def split_scope(key: str) -> tuple[str | None, str]:
    """`gossip:topology` -> ("gossip", "topology"); `eps` -> (None, "eps")."""
    scope, sep, name = key.rpartition(SCOPE)
    return (scope, name) if sep else (None, key)


@dataclass
class SweepSpec:
    """What to run: fixed keys, swept keys (lists) and the number of simulated nodes."""

    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    nodes: int = DEFAULT_NODES
    variants: list[dict[str, Any]] = field(default_factory=list)

    def copy(self) -> SweepSpec:
        """A deep copy, so presets are never mutated."""
        return copy.deepcopy(self)

    def _drop(self, key: str) -> None:
        """Forget `key`; an unscoped key also overrides every scoped use of it."""
        scope, name = split_scope(key)
        for table in (self.fixed, self.grid, *self.variants):
            for k in list(table):
                if k == key or (scope is None and split_scope(k)[1] == name):
                    del table[k]
        self.variants = _unique([v for v in self.variants if v])

    def set(self, key: str, value: Any) -> SweepSpec:
        """Fix `key` (replacing any list or scoped value of it)."""
        _check_key(key)
        self._drop(key)
        self.fixed[key] = value
        return self

    def sweep(self, key: str, values: Iterable[Any]) -> SweepSpec:
        """Sweep `key` over `values` (replacing any fixed or scoped value of it)."""
        _check_key(key)
        values = list(values)
        if not values:
            raise SweepError(f"--sweep {key}= has no values")
        keys = list(self.grid)
        self._drop(key)
        if key in keys:  # keep its place in the product order
            kept = self.grid
            self.grid = {k: values if k == key else kept[k] for k in keys if k == key or k in kept}
        else:
            self.grid[key] = values
        return self

    def vary(self, variant: Mapping[str, Any]) -> SweepSpec:
        """Add a variant: keys set together (each key is then no longer fixed or swept)."""
        if not variant:
            raise SweepError("a variant needs at least one key=value")
        for key, value in variant.items():
            _check_key(key)
            if isinstance(value, list):
                raise SweepError(f"variant {key}={value!r}: a variant sets one value per key")
            for table in (self.fixed, self.grid):
                table.pop(key, None)
        self.variants = _unique([*self.variants, dict(variant)])
        return self

    def to_dict(self) -> dict[str, Any]:
        """For the manifest (`variants` only when there are some)."""
        out = {"fixed": dict(self.fixed), "swept": dict(self.grid), "nodes": self.nodes}
        return out | ({"variants": [dict(v) for v in self.variants]} if self.variants else {})


def _unique(variants: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Variants in order, each once."""
    out: list[dict[str, Any]] = []
    for v in variants:
        if v not in out:
            out.append(v)
    return out


def variant_keys(variants: Iterable[Mapping[str, Any]]) -> list[str]:
    """Unscoped key names the variants set, in order of appearance."""
    return list(dict.fromkeys(split_scope(k)[1] for v in variants for k in v))


def variants_for(variants: Iterable[Mapping[str, Any]], strategy: str) -> list[dict[str, Any]]:
    """The variants as one strategy sees them: unscoped keys and its own, each distinct once."""
    reduced = [
        {split_scope(k)[1]: v for k, v in variant.items() if split_scope(k)[0] in (None, strategy)}
        for variant in variants
    ]
    return _unique(reduced) or [{}]


def _check_key(key: str) -> None:
    scope, name = split_scope(key)
    if not name or scope == "":
        raise SweepError(f"bad key {key!r}: expected a run-config key, or strategy:key")
    if name in RESERVED:
        raise SweepError(
            f"{name} is set by the sweep (results-dir = <out>/runs, run-name = cell id, cells = "
            "the cell list of its Flower run); remove it"
        )
    if scope is not None and name == "strategy":
        raise SweepError(f"{key}: strategy cannot be scoped to a strategy")
    if scope is not None and scope not in STRATEGIES:
        raise SweepError(
            f"{key}: {scope!r} is not a strategy; scope a key with one of: "
            f"{', '.join(STRATEGIES)} (e.g. gossip:{name}), or leave it unscoped"
        )
    if scope is not None and name not in RUN_CONFIG_KEYS:
        raise SweepError(
            f"{key}: unknown run-config key {name!r}; valid keys: {', '.join(RUN_CONFIG_KEYS)}"
        )


def parse_value(text: str) -> Any:
    """A value as TOML would read it (`inf` float, `2` int, `true` bool); else the bare string."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_values(text: str) -> list[Any]:
    """`inf,8,2` -> [inf, 8, 2]."""
    values = [parse_value(v) for v in text.split(",") if v.strip()]
    if not values:
        raise SweepError(f"no values in {text!r}")
    return values


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    """`key=value` -> (key, value), with a one-line error naming the flag."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SweepError(f"{flag} {text!r}: expected key=value")
    return key.strip(), value


def load_spec(path: Path, base: SweepSpec | None = None) -> SweepSpec:
    """Read a SPEC.toml (`nodes`, `[fixed]`, `[grid]`, `[[variants]]`; sub-tables scope keys)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SweepError(f"cannot read spec {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise SweepError(f"spec {path} is not valid TOML: {err}") from None
    if unknown := sorted(set(doc) - {"nodes", "fixed", "grid", "variants"}):
        raise SweepError(
            f"spec {path}: unknown entries {unknown}; expected nodes, [fixed], [grid], [[variants]]"
        )
    spec = base.copy() if base else SweepSpec()
    if "nodes" in doc:
        spec.nodes = doc["nodes"]
    for key, value in _flatten(doc.get("fixed", {}), "fixed", path).items():
        if isinstance(value, list):
            raise SweepError(f"spec {path}: fixed.{key} is a list; put it under [grid]")
        spec.set(key, value)
    for key, value in _flatten(doc.get("grid", {}), "grid", path).items():
        if not isinstance(value, list):
            raise SweepError(f"spec {path}: grid.{key} must be a list, e.g. {key} = [1, 2]")
        spec.sweep(key, value)
    variants = doc.get("variants", [])
    if not isinstance(variants, list):
        raise SweepError(f"spec {path}: variants must be an array of tables ([[variants]])")
    for i, variant in enumerate(variants):
        spec.vary(_flatten(variant, f"variants[{i}]", path))
    return spec


def parse_variant(text: str) -> dict[str, Any]:
    """`gossip:topology=ring gossip:gossip-mode=edges` -> one variant (keys set together)."""
    pairs = [parse_assignment(part, "--variant") for part in text.split()]
    if not pairs:
        raise SweepError("--variant '': expected key=value pairs separated by spaces")
    return {k.strip(): parse_value(v) for k, v in pairs}


def _flatten(table: Any, name: str, path: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SweepError(f"spec {path}: {name} must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):  # [grid.gossip] -> gossip:key
            out |= {f"{key}{SCOPE}{k}": v for k, v in value.items()}
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Cell:
    """One run of the sweep.

    `params` are the run-config overrides (canonical types, kebab-case); `coords` are the
    cell's coordinates: strategy, eps and seed always, plus every swept key.
    """

    id: str
    params: dict[str, Any]
    coords: dict[str, Any]
    rounds: int


def swept_keys(spec: SweepSpec) -> list[str]:
    """Swept run-config keys without scope, in product order."""
    keys: list[str] = []
    for name in [*(split_scope(k)[1] for k in spec.grid), *variant_keys(spec.variants)]:
        if name not in keys:
            keys.append(name)
    return keys


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, each validated by RunConfig; SweepError on the first bad one."""
    if isinstance(spec.nodes, bool) or not isinstance(spec.nodes, int) or spec.nodes < 1:
        raise SweepError(f"nodes={spec.nodes!r} is not valid; expected an integer >= 1")
    for key, values in spec.grid.items():
        _check_key(key)
        if not values:
            raise SweepError(f"grid key {key} has no values")
    for key in spec.fixed:
        _check_key(key)
    for variant in spec.variants:
        if not variant:
            raise SweepError("a variant needs at least one key=value")
        for key in variant:
            _check_key(key)
    plain = [k for k in spec.grid if split_scope(k)[0] is None]
    default_strategy = spec.fixed.get("strategy", RunConfig().strategy)
    cells: list[Cell] = []
    for combo in product(*(spec.grid[k] for k in plain)):
        chosen = dict(zip(plain, combo, strict=True))
        strategy = str(chosen.get("strategy", default_strategy))
        scoped = [k for k in spec.grid if split_scope(k)[0] == strategy]
        for scombo, variant in product(
            product(*(spec.grid[k] for k in scoped)), variants_for(spec.variants, strategy)
        ):
            extra = {split_scope(k)[1]: v for k, v in zip(scoped, scombo, strict=True)}
            extra |= variant
            params = {k: v for k, v in spec.fixed.items() if split_scope(k)[0] is None}
            params |= {
                split_scope(k)[1]: v for k, v in spec.fixed.items() if split_scope(k)[0] == strategy
            }
            params |= chosen | extra
            cells.append(make_cell(params, list(chosen) + list(extra)))
    seen: set[str] = set()
    for cell in cells:
        if cell.id in seen:
            raise SweepError(f"two cells share the id {cell.id}: is a value listed twice?")
        seen.add(cell.id)
    return cells


def check_cells(cells: Sequence[Cell], nodes: int) -> None:
    """Every check a run makes before training, on every cell with `nodes` simulated nodes.

    The ServerApp's own checks (`flower_app.preflight`): the node count against num-nodes and
    min-available-nodes, the gossip graph, the privacy plan, the data. SweepError (one line,
    naming the cell) on the first cell a run would refuse, or wait for nodes that never come.
    """
    from flower_app.data import DatasetMissing  # torch: loaded by commands that check cells
    from flower_app.preflight import preflight

    for cell in cells:
        try:
            preflight(RunConfig.from_run_config(cell.params), nodes)
        except (ConfigError, DatasetMissing) as err:
            raise SweepError(f"invalid sweep: cell {cell.id} on {nodes} nodes: {err}") from None


def make_cell(params: Mapping[str, Any], swept: Sequence[str]) -> Cell:
    """The validated cell of these run-config overrides; `swept` keys join its coordinates."""
    # A cell repeats bit for bit only with seeded DP noise: the sweep seeds it with the
    # cell's seed unless the spec sets noise-seed itself (-1: secret noise). The report says
    # that such noise is not private against anyone who knows noise-seed.
    if "noise-seed" not in params:
        params = {**params, "noise-seed": params.get("seed", RunConfig().seed)}
    try:
        cfg = RunConfig.from_run_config({**params, "results-dir": "", "run-name": ""})
    except ConfigError as err:
        raise SweepError(f"invalid sweep: {err}") from None
    full = cfg.to_dict()
    coords = {k: full[k] for k in CORE} | {k: full[k] for k in swept}
    return Cell(
        id=cell_id(coords),
        params={k: full[k] for k in params},
        coords=coords,
        rounds=cfg.num_server_rounds,
    )


def _token(value: Any) -> str:
    if isinstance(value, float):
        return format_eps(value)
    return str(value)


def cell_id(coords: Mapping[str, Any]) -> str:
    """`fedavg-eps2-seed7`, then each other swept key: `lr0.1`, `topology-ring`."""
    parts = [str(coords["strategy"]), f"eps{_token(coords['eps'])}", f"seed{coords['seed']}"]
    for key, value in coords.items():
        if key in CORE:
            continue
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        parts.append(f"{key}{_token(value)}" if numeric else f"{key}-{_token(value)}")
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", "-".join(parts))
