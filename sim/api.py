"""The Python API: `fl-sweep run/tune` and `fl-audit run` from a notebook, results as DataFrames.

```python
from sim import api

result = api.sweep(strategies=["fedavg", "gossip"], eps=[inf, 2], nodes=6, rounds=3,
                   samples_per_node=200, test_samples=500)
result.final                 # final accuracy per strategy and ε: mean, 95% t half-width, ...
result.rounds                # one row per cell × round (sweep.csv)
result.figures()             # name -> matplotlib Figure, unsaved
api.load("results/sweeps/quick-20260101T120000Z")   # an existing folder, the same Result
```

Each function turns its arguments into the command line it stands for (a run-config key
given once is `--set key=value`, a list `--sweep key=v1,v2`; snake_case or kebab-case) and
runs it through the CLI's own machinery, so it checks, runs, resumes and writes the folder
exactly as the command would; the manifest records that command. Bad input raises
`SweepError` (a ValueError) with the line the command would print.
"""

from __future__ import annotations

import argparse
import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flower_app.results import package_version
from sim.sweeps.spec import SweepError

if TYPE_CHECKING:
    import pandas as pd

    from sim.analysis.sweep_data import SweepData
    from sim.launch.flwr_cli import RunOutcome
    from sim.sweeps.runners import Runner

__all__ = ["Result", "RunFailed", "SweepError", "audit", "load", "run", "sweep", "tune"]
__version__ = package_version()


class RunFailed(RuntimeError):
    """`run`'s one experiment did not complete: the line Flower or the ServerApp gave."""


def normalize_key(key: str) -> str:
    """`num_server_rounds` -> `num-server-rounds`; a scope stays (`gossip:gossip_mode`)."""
    scope, sep, name = key.rpartition(":")
    return f"{scope}{sep}{name.replace('_', '-')}"


def as_text(value: Any) -> str:
    """A value as the command line spells it (`inf`, `true`, `0.05`; a list comma-joined)."""
    if isinstance(value, list | tuple):
        return ",".join(as_text(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if value == math.inf else repr(value)
    return str(value)


def key_flags(keys: Mapping[str, Any]) -> list[str]:
    """Run-config keys as flags: one value `--set key=value`, a list `--sweep key=v1,v2`."""
    argv: list[str] = []
    for key, value in keys.items():
        flag = "--sweep" if isinstance(value, list | tuple) else "--set"
        argv += [flag, f"{normalize_key(key)}={as_text(value)}"]
    return argv


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """CLI options as flags: None and False left out, True bare, dicts repeated per key.

    `set` and `sweep` take {key: value(s)}; `variants` a list of {key: value} (keys set
    together); any other list is comma-joined (`eps=[inf, 2]` is `--eps inf,2`).
    """
    argv: list[str] = []
    for name, value in options.items():
        flag = "--variant" if name == "variants" else "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, Mapping):
            argv += [
                x for k, v in value.items() for x in (flag, f"{normalize_key(k)}={as_text(v)}")
            ]
        elif name == "variants":
            for variant in value:
                pairs = " ".join(f"{normalize_key(k)}={as_text(v)}" for k, v in variant.items())
                argv += [flag, pairs]
        else:
            argv += [flag, as_text(value)]
    return argv


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """`parser`'s reading of `argv`; its one-line refusal as SweepError instead of exit 2."""
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise SweepError(err.getvalue().strip()) from None


class LinkRunner:
    """Cells on a SuperLink the caller started (and stops): one Flower run per sweep stage.

    A fresh `BatchedRunner` per stage (`plan` is called as each stage starts), writing its
    cell lists into that stage's folder, as `fl-sweep` does with the SuperLink it owns.
    """

    def __init__(self, link: Any, timeout: float) -> None:
        """Submit to `link` (a running `SimulationLink`); fail a cell after `timeout` s."""
        self.link, self.timeout = link, timeout
        self.batched: Any = None

    def plan(self, run_configs: Sequence[Mapping[str, Any]]) -> None:
        """The stage's cells, in order (their `results-dir` is `<stage folder>/runs`)."""
        from sim.sweeps.runners import BATCHES, BatchedRunner, ensure_running

        if not run_configs:
            return
        folder = Path(run_configs[0]["results-dir"]).parent / BATCHES
        check = partial(ensure_running, self.link)
        self.batched = BatchedRunner(self.link, folder, self.timeout, check_link=check)
        self.batched.plan(run_configs)

    def __call__(
        self, run_config: dict[str, Any], *, num_nodes: int, on_poll: Callable[[], None]
    ) -> RunOutcome:
        """Wait for the cell (submitting the stage's run first)."""
        return self.batched(run_config, num_nodes=num_nodes, on_poll=on_poll)  # type: ignore[no-any-return]

    def logs(self, run_id: str) -> str:
        """The log of the Flower run a failed cell was part of."""
        return str(self.batched.logs(run_id))


def _runner(link: Any, runner: Runner | None, timeout: float, per_cell: bool) -> Runner | None:
    """`runner` (tests), else cells on `link` if given, else None (the CLI starts its own)."""
    if runner is not None or link is None:
        return runner
    if per_cell:
        from sim.sweeps.runners import FlowerRunner

        return FlowerRunner(link, timeout)
    return LinkRunner(link, timeout)


def _execute(program: str, argv: list[str], runner: Runner | None) -> Result | None:
    """Run the command line `argv` of `program` (fl-sweep or fl-audit) as its CLI would."""
    from sim.sweeps import audit as audit_cli
    from sim.sweeps import cli
    from sim.sweeps.flags import check_args

    args = parse(audit_cli.build_parser() if program == "fl-audit" else cli.build_parser(), argv)
    cli.setup_logging()
    check_args(args)
    if program == "fl-audit":
        argv = audit_cli.audit_grid(args, argv)
    if args.command == "tune":
        code = cli.command_tune(args, argv, runner)
    else:
        code = cli.command_run(args, argv, runner, prog=program)
    if code == 130:
        raise KeyboardInterrupt(f"{program} interrupted; call again with the same out to resume")
    if args.dry_run:
        return None
    out = args.out.expanduser().resolve()
    if program == "fl-audit":
        _audit_report(out)
    result = load(out)
    if code and (failed := result.failed or ["none failed, some did not run"]):
        warnings.warn(
            f"{program} exit code {code}: {len(result.cells)} cells, {', '.join(failed)} "
            "(see result.cells); call again with the same out to retry them",
            stacklevel=3,
        )
    return result


def _audit_report(out: Path) -> None:
    """audit.csv, audit.md and the audit figures, as `fl-audit run` writes them."""
    from sim.analysis.audit import violations, write_audit_report

    df, _ = write_audit_report(out)
    if len(bad := violations(df)):
        warnings.warn(
            f"{len(bad)} observer(s) found more leakage than the accountant allows (see "
            f"{out / 'audit.md'}): the accounting or the audit is wrong",
            stacklevel=4,
        )


def _out(out: str | Path | None, name: str, root: str) -> Path:
    """`out`, else a new timestamped folder under the project's `root`, as the CLI picks."""
    from sim.sweeps.folders import default_out

    return Path(out) if out is not None else default_out(name, root=root)


def run(
    *,
    nodes: int | None = None,
    out: str | Path | None = None,
    timeout: float = 3600,
    link: Any = None,
    runner: Runner | None = None,
    **keys: Any,
) -> Result:
    """One experiment with these run-config keys, as `flwr run . --run-config` takes them.

    `run(strategy="gossip", eps=2, num_server_rounds=5, nodes=6)`: each key is
    `fl-sweep run --set key=value` (snake_case or kebab-case), so the run is a one-cell
    sweep in `out` (default `results/sweeps/run-<UTC time>`), with seeded noise
    (`noise-seed` = `seed`) unless `noise_seed` is given (-1: secret noise). `nodes` is the
    number of simulated SuperNodes (default 20). `link`: a running `SimulationLink` to use
    instead of starting one. Raises SweepError for bad input, RunFailed if the run failed.
    """
    if lists := [k for k, v in keys.items() if isinstance(v, list | tuple)]:
        raise SweepError(f"run() takes one value per key; {lists[0]} has several: use sweep()")
    argv = ["run", *option_flags({"set": keys, "nodes": nodes, "timeout": timeout})]
    argv += ["--out", str(_out(out, "run", "results/sweeps"))]
    result = _execute("fl-sweep", argv, _runner(link, runner, timeout, False))
    assert result is not None
    if result.failed:
        cell = result.cells.iloc[0]
        raise RunFailed(f"{cell['id']} {cell['status']}: {cell['error']} (in {result.folder})")
    return result


def _grid(spec: str | Path | None, grid: Mapping[str, Any], keys: Mapping[str, Any]) -> list[str]:
    """The grid flags: SPEC.toml, the options, then the run-config keys given as keywords."""
    return ([str(spec)] if spec is not None else []) + option_flags(grid) + key_flags(keys)


def sweep(
    spec: str | Path | None = None,
    *,
    preset: str | None = None,
    nodes: int | None = None,
    strategies: str | Sequence[str] | None = None,
    eps: Any = None,
    seeds: Any = None,
    rounds: int | None = None,
    set: Mapping[str, Any] | None = None,  # the CLI's --set
    sweep: Mapping[str, Any] | None = None,
    variants: Sequence[Mapping[str, Any]] = (),
    out: str | Path | None = None,
    timeout: float = 3600,
    parallel_cells: int | None = None,
    ray_address: str | None = None,
    gpus_per_node: float | None = None,
    run_per_cell: bool = False,
    dry_run: bool = False,
    target_accuracy: float | None = None,
    link: Any = None,
    runner: Runner | None = None,
    **keys: Any,
) -> Result | None:
    """`fl-sweep run`: a grid of runs, resumable with the same `out`; its Result.

    The arguments are the command's flags (`strategies=["fedavg", "gossip"]` is
    `--strategies fedavg,gossip`, `set={"gossip:topology": "ring"}` is `--set
    gossip:topology=ring`, `sweep={"lr": [0.05, 0.1]}`, `variants=[{...}, ...]`); any other
    keyword is a run-config key, fixed (`samples_per_node=200`) or swept (`lr=[0.05, 0.1]`).
    `gpus_per_node=0.25` gives each simulated node a quarter of a GPU (`--gpus-per-node`).
    `dry_run=True` checks everything, lists the cells and returns None. `link`: a running
    `SimulationLink` to use instead of starting one. Bad input raises SweepError.
    """
    grid = {"preset": preset, "nodes": nodes, "strategies": strategies, "eps": eps}
    grid |= {"seeds": seeds, "rounds": rounds, "set": set, "sweep": sweep, "variants": variants}
    where = {"timeout": timeout, "parallel_cells": parallel_cells, "ray_address": ray_address}
    where |= {"gpus_per_node": gpus_per_node, "run_per_cell": run_per_cell, "dry_run": dry_run}
    where |= {"target_accuracy": target_accuracy}
    argv = ["run", *_grid(spec, grid, keys), *option_flags(where)]
    argv += ["--out", str(_out(out, preset or "sweep", "results/sweeps"))]
    return _execute("fl-sweep", argv, _runner(link, runner, timeout, run_per_cell))


def tune(
    spec: str | Path | None = None,
    *,
    preset: str | None = None,
    search: Mapping[str, Sequence[Any]] | None = None,
    tune_seeds: Any = None,
    out: str | Path | None = None,
    timeout: float = 3600,
    dry_run: bool = False,
    link: Any = None,
    runner: Runner | None = None,
    **grid: Any,
) -> Result | None:
    """`fl-sweep tune`: choose each (strategy, ε) cell's hyperparameters, then test them.

    `search={"lr": [0.05, 0.1]}` is `--search lr=0.05,0.1`; every other argument is as in
    `sweep` (its grid flags, `nodes`, `parallel_cells`, run-config keywords). The Result is
    the final stage's (on the test set), with `result.choices`: what each cell chose.
    """
    flags = {k: grid.pop(k) for k in _SWEEP_ONLY if k in grid}
    keys = {k: v for k, v in grid.items() if k not in flags}
    options = {"preset": preset, **flags, "tune_seeds": tune_seeds}
    options |= {"timeout": timeout, "dry_run": dry_run}
    argv = ["tune", *_grid(spec, options, keys)]
    argv += [x for k, v in (search or {}).items() for x in ("--search", f"{k}={as_text(v)}")]
    argv += ["--out", str(_out(out, preset or "tune", "results/tune"))]
    per_cell = bool(flags.get("run_per_cell"))
    return _execute("fl-sweep", argv, _runner(link, runner, timeout, per_cell))


# `sweep`'s flags other than its run-config keywords, which `tune` and `audit` take too.
_SWEEP_ONLY = (
    "nodes",
    "strategies",
    "eps",
    "seeds",
    "rounds",
    "set",
    "sweep",
    "variants",
    "parallel_cells",
    "ray_address",
    "gpus_per_node",
    "run_per_cell",
)


def audit(
    spec: str | Path | None = None,
    *,
    preset: str | None = None,
    canaries: int = 100,
    audit_seed: int = 0,
    out: str | Path | None = None,
    timeout: float = 3600,
    dry_run: bool = False,
    link: Any = None,
    runner: Runner | None = None,
    **grid: Any,
) -> Result | None:
    """`fl-audit run`: one-run privacy audits of a grid; `result.audit` is the audit table.

    Takes `sweep`'s grid arguments (`strategies`, `eps`, `nodes`, run-config keywords, ...);
    `canaries` per node and the auditor's `audit_seed` as `fl-audit run` takes them.
    """
    flags = {k: grid.pop(k) for k in _SWEEP_ONLY if k in grid}
    keys = {k: v for k, v in grid.items() if k not in flags}
    options = {"preset": preset, **flags, "canaries": canaries, "audit_seed": audit_seed}
    options |= {"timeout": timeout, "dry_run": dry_run}
    argv = ["run", *_grid(spec, options, keys)]
    argv += ["--out", str(_out(out, preset or "audit", "results/audits"))]
    per_cell = bool(flags.get("run_per_cell"))
    return _execute("fl-audit", argv, _runner(link, runner, timeout, per_cell))


def load(folder: str | Path) -> Result:
    """The results stored in a sweep, tune or audit folder (nothing is run or written).

    A tune folder (`tune.json`) gives its final stage, with `result.choices`.
    """
    from sim.sweeps.folders import sweep_folder
    from sim.sweeps.tune import CHOICES, FINAL

    path = Path(folder).expanduser().resolve()
    if (path / CHOICES).is_file():
        return Result(sweep_folder(path / FINAL), tune_folder=path)
    return Result(sweep_folder(path))


class Result:
    """A sweep folder's results: DataFrames, and matplotlib figures drawn on demand, unsaved."""

    def __init__(self, folder: Path, *, tune_folder: Path | None = None) -> None:
        """Read `folder` lazily (`tune_folder`: the tune folder whose final stage it is)."""
        self.folder, self.tune_folder = folder, tune_folder

    def __repr__(self) -> str:
        """`Result(<folder>: 4 cells, 4 completed)`."""
        done = int((self.cells["status"] == "completed").sum())
        failed = f", failed: {', '.join(self.failed)}" if self.failed else ""
        return f"Result({self.folder}: {len(self.cells)} cells, {done} completed{failed})"

    @cached_property
    def data(self) -> SweepData:
        """The sweep as the figures and the report read it."""
        from sim.analysis.sweep_data import SweepData

        return SweepData.load(self.folder)

    @property
    def rounds(self) -> pd.DataFrame:
        """One row per completed cell × round (sweep.csv; `held_accuracy` added)."""
        return self.data.tidy

    @property
    def final(self) -> pd.DataFrame:
        """Per series and ε: seeds `n`, final accuracy `mean` ± `half` (95% t), ε spent, wall."""
        from sim.analysis.report import final_summary

        return final_summary(self.data)

    @property
    def table(self) -> pd.DataFrame:
        """The final table as `fl-sweep` prints it (text: `81.2 ± 1.3` in percent)."""
        import pandas as pd

        from sim.analysis.report import final_summary, summary_rows

        header, rows = summary_rows(self.data, final_summary(self.data))
        return pd.DataFrame(rows, columns=header)

    @property
    def cells(self) -> pd.DataFrame:
        """One row per cell of the grid: id, status, error, wall_s and its coordinates."""
        import pandas as pd

        rows = [
            {k: c.get(k) for k in ("id", "status", "error", "wall_s")} | c.get("coords", {})
            for c in self.data.manifest.get("cells", [])
        ]
        return pd.DataFrame(rows, columns=None if rows else ["id", "status", "error", "wall_s"])

    @property
    def failed(self) -> list[str]:
        """Ids of the failed cells."""
        return [c["id"] for c in self.data.manifest.get("cells", []) if c["status"] == "failed"]

    @cached_property
    def audit(self) -> pd.DataFrame:
        """One row per (completed cell, observer) with its audit.json (empty without)."""
        from sim.analysis.audit import collect

        return collect(self.folder)

    @cached_property
    def choices(self) -> pd.DataFrame | None:
        """A tune's choice per (strategy, ε) cell and its validation accuracy; else None."""
        if self.tune_folder is None:
            return None
        import json

        from sim.sweeps.tune import CHOICES, chosen_table

        doc = json.loads((self.tune_folder / CHOICES).read_text(encoding="utf-8"))
        return chosen_table(doc["groups"])

    def figures(self, *, target: float | None = None) -> dict[str, Any]:
        """Every figure the results support, name -> matplotlib Figure, unsaved.

        `target`: the rounds-to-target figure's accuracy (a fraction; default 90% of the
        best non-private final accuracy). Figures without data are left out (logged).
        """
        from sim.analysis.audit import draw_audit
        from sim.analysis.drawing import Figure
        from sim.analysis.plots import draw_all

        drawn = draw_all(self.data, target=target)
        figures = {f.name: f.figure for f in drawn if isinstance(f, Figure)}
        return figures | draw_audit(self.audit)
