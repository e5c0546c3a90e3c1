import math

import pytest

from flower_app.config import RunConfig
from sim.sweeps.cli import main
from sim.sweeps.flags import build_parser, spec_from_args
from sim.sweeps.folders import default_out
from sim.sweeps.presets import PRESETS
from sim.sweeps.spec import (
    SweepError,
    SweepSpec,
    cell_id,
    expand,
    load_spec,
    parse_value,
    parse_values,
)

STRATEGIES = RunConfig.__dataclass_fields__["strategy"].metadata["choices"]
needs_gossip = pytest.mark.skipif("gossip" not in STRATEGIES, reason="gossip not accepted yet")


def spec_of(*argv):
    return spec_from_args(build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("inf", math.inf),
        ("2", 2),
        ("0.5", 0.5),
        ("1e-5", 1e-5),
        ("ring", "ring"),
        ("true", True),
        ('"8"', "8"),
        ("k-regular", "k-regular"),
    ],
)
def test_values_parse_like_toml_and_bare_words_are_strings(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_parse_values_splits_commas_and_rejects_empty():
    assert parse_values("inf, 8,2") == [math.inf, 8, 2]
    with pytest.raises(SweepError):
        parse_values(" , ")


def test_grid_is_the_cartesian_product_in_order_with_deterministic_ids():
    spec = SweepSpec(
        fixed={"num-server-rounds": 2},
        grid={"strategy": ["fedavg"], "eps": [math.inf, 2], "seed": [7, 8], "lr": [0.1, 0.05]},
        nodes=3,
    )
    cells = expand(spec)
    assert [c.id for c in cells] == [
        f"fedavg-eps{e}-seed{s}-lr{lr}"
        for e in ("inf", "2")
        for s in (7, 8)
        for lr in ("0.1", "0.05")
    ]
    assert [c.id for c in expand(spec)] == [c.id for c in cells]  # deterministic
    first = cells[0]
    assert first.params == {
        "num-server-rounds": 2,
        "strategy": "fedavg",
        "eps": math.inf,
        "seed": 7,
        "lr": 0.1,
        "noise-seed": 7,  # repeatable cells: the sweep seeds the DP noise with the cell's seed
    }
    assert cells[2].params["noise-seed"] == 8
    secret = expand(SweepSpec(fixed={"noise-seed": -1}, grid={"seed": [7]}))[0]
    assert secret.params["noise-seed"] == -1
    assert first.coords == {"strategy": "fedavg", "eps": math.inf, "seed": 7, "lr": 0.1}
    assert first.rounds == 2
    assert isinstance(cells[4].params["eps"], float)  # canonical RunConfig types: 2 -> 2.0


def test_ids_always_name_strategy_eps_and_seed_even_when_not_swept():
    cells = expand(SweepSpec(grid={"lr": [0.1]}))
    default = RunConfig()
    assert cells[0].id == f"{default.strategy}-eps{default.eps:g}-seed{default.seed}-lr0.1"
    assert cell_id({"strategy": "gossip", "eps": 2.0, "seed": 7, "topology": "k regular"}) == (
        "gossip-eps2-seed7-topology-k_regular"
    )


def test_set_overrides_a_swept_key_and_sweep_overrides_a_fixed_one():
    spec = SweepSpec(grid={"eps": [math.inf, 2], "seed": [7, 8]}).set("eps", 4)
    assert "eps" not in spec.grid and spec.fixed["eps"] == 4
    assert len(expand(spec)) == 2
    spec = SweepSpec(fixed={"lr": 0.1}).sweep("lr", [0.2, 0.3])
    assert "lr" not in spec.fixed and spec.grid["lr"] == [0.2, 0.3]
    # flags override the preset; a scoped flag after its unscoped one narrows it
    spec = spec_of("--preset", "quick", "--set", "lr=0.1", "--set", "gossip:lr=0.05")
    assert spec.fixed["lr"] == 0.1 and spec.fixed["gossip:lr"] == 0.05


@pytest.mark.parametrize(
    "argv",
    [
        ["--eps", "inf,2", "--set", "eps=4"],
        ["--set", "lr=0.1", "--sweep", "lr=0.2,0.3"],
        ["--rounds", "3", "--set", "num-server-rounds=4"],
        ["--set", "lr=0.1", "--set", "lr=0.2"],
        ["--set", "gossip:lr=0.1", "--set", "lr=0.2"],
        ["--set", "topology=ring", "--variant", "topology=torus"],
    ],
)
def test_two_flags_giving_one_key_are_refused(argv):
    with pytest.raises(SweepError, match="both give"):
        spec_of(*argv)


def test_preset_flags_override_the_preset_and_presets_are_not_mutated():
    before = PRESETS["quick"].spec.copy()
    spec = spec_of("--preset", "quick", "--eps", "1", "--nodes", "3", "--strategies", "fedavg")
    assert spec.grid["eps"] == [1] and spec.nodes == 3 and spec.grid["strategy"] == ["fedavg"]
    assert spec.fixed["samples-per-node"] == 1000
    assert PRESETS["quick"].spec == before
    # a later --sweep key goes innermost; re-sweeping a key keeps its place
    spec = spec_of("--preset", "quick", "--sweep", "lr=0.1,0.2", "--sweep", "eps=1,2")
    assert list(spec.grid) == ["strategy", "eps", "seed", "lr"]


def test_reference_preset_matches_the_brief():
    spec = PRESETS["reference"].spec
    assert spec.nodes == 20 and spec.fixed["num-server-rounds"] == 20
    assert spec.fixed["partitioner"] == "dirichlet" and spec.fixed["alpha"] == 0.5
    assert spec.grid == {
        "strategy": ["fedavg", "gossip"],
        "eps": [math.inf, 8, 4, 2, 1],
        "seed": [7, 8, 9],
    }
    assert spec.fixed["gossip:topology"] == "ring"


def test_scoped_keys_reach_only_their_strategy():
    spec = SweepSpec(
        fixed={"gossip:gossip-mode": "matching"},
        grid={"strategy": ["fedavg", "gossip"], "eps": [2], "gossip:topology": ["ring", "torus"]},
    )
    if "gossip" not in STRATEGIES:
        pytest.skip("gossip not accepted yet")
    cells = expand(spec)
    assert [c.id for c in cells] == [
        "fedavg-eps2-seed7",
        "gossip-eps2-seed7-topology-ring",
        "gossip-eps2-seed7-topology-torus",
    ]
    assert "topology" not in cells[0].params and "gossip-mode" not in cells[0].params
    assert cells[1].params["gossip-mode"] == "matching"
    # an unscoped --set wins over every scoped value of the key
    spec.set("topology", "complete")
    assert "gossip:topology" not in spec.grid and spec.fixed["topology"] == "complete"


def test_scoped_values_of_an_absent_strategy_are_not_validated_but_their_keys_are():
    cells = expand(SweepSpec(fixed={"gossip:lr": -1}, grid={"strategy": ["fedavg"]}))
    assert len(cells) == 1 and "lr" not in cells[0].params
    with pytest.raises(SweepError, match="'nosuch' is not a strategy"):
        expand(SweepSpec(fixed={"nosuch:lr": 1}, grid={"strategy": ["fedavg"]}))
    with pytest.raises(SweepError, match="unknown run-config key 'topolgy'"):
        expand(SweepSpec(fixed={"gossip:topolgy": "ring"}, grid={"strategy": ["fedavg"]}))


def test_load_spec_reads_fixed_grid_nodes_and_scoped_tables(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(
        'nodes = 4\n[fixed]\nnum-server-rounds = 2\n[fixed.gossip]\ntopology = "ring"\n'
        '[grid]\neps = [inf, 2]\nseed = [7, 8]\n[grid.gossip]\ngossip-mode = ["matching"]\n'
    )
    spec = load_spec(path)
    assert spec.nodes == 4
    assert spec.fixed == {"num-server-rounds": 2, "gossip:topology": "ring"}
    assert spec.grid == {"eps": [math.inf, 2], "seed": [7, 8], "gossip:gossip-mode": ["matching"]}
    path.write_text("[grid]\neps = 2\n")
    with pytest.raises(SweepError, match="grid.eps must be a list"):
        load_spec(path)
    path.write_text("[fixd]\neps = 2\n")
    with pytest.raises(SweepError, match="unknown entries"):
        load_spec(path)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--sweep", "lrr=0.1,0.2"], "unknown run-config key(s): lrr"),
        (["--set", "eps=-1"], "eps=-1.0 is not valid"),
        (["--eps", "inf,2,abc"], "eps='abc' is not valid"),
        (["--strategies", "fedavg,fedprox"], "strategy='fedprox' is not valid"),
        (["--set", "run-name=x"], "run-name is set by the sweep"),
        (["--eps", "2,2.0"], "two cells share the id fedavg-eps2-seed7"),
        (["--nodes", "0"], "nodes=0 is not valid"),
        (["--set", "lr"], "--set 'lr': expected key=value"),
    ],
)
def test_a_bad_cell_is_rejected_in_one_line_before_anything_is_written(
    tmp_path, capsys, argv, needle
):
    out = tmp_path / "sweep"
    runner_calls = []
    rc = main(
        ["run", "--strategies", "fedavg", "--out", str(out), *argv],
        runner=lambda *a, **k: runner_calls.append(a),
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not runner_calls


def test_the_last_cell_is_validated_too(tmp_path, capsys):
    # only the last cell of the product is bad: nothing may run
    rc = main(
        [
            "run",
            "--strategies",
            "fedavg",
            "--eps",
            "inf,2",
            "--sweep",
            "lr=0.1,-0.1",
            "--out",
            str(tmp_path / "s"),
        ],
        runner=lambda *a, **k: pytest.fail("ran"),
    )
    assert rc == 2 and "lr=-0.1 is not valid" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_dry_run_lists_cells_and_writes_nothing(tmp_path, capsys):
    rc = main(
        [
            "run",
            "--strategies",
            "fedavg",
            "--eps",
            "inf,2",
            "--out",
            str(tmp_path / "s"),
            "--dry-run",
        ]
    )
    assert rc == 0 and not (tmp_path / "s").exists()
    out = capsys.readouterr().out  # the listing is the command's output: stdout
    assert "fedavg-eps2-seed7" in out and "2 cells on 20 nodes: all valid" in out


def test_default_out_hangs_off_the_project_results_folder():
    from datetime import UTC, datetime

    from flower_app.results import resolve_results_dir

    path = default_out("quick", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert path == resolve_results_dir("results/sweeps/quick-20260102T030405Z")
    assert path.is_absolute()


@needs_gossip
def test_quick_preset_is_valid_as_is():
    cells = expand(PRESETS["quick"].spec)
    assert len(cells) == 4 and all(c.rounds == 5 for c in cells)
    assert {c.params.get("topology") for c in cells} == {None, "ring"}
