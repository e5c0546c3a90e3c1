"""Sweep variants: chosen key combinations instead of a full product."""

import pytest

from sim.analysis.final_figures import bar_gaps
from sim.analysis.sweep_data import SweepData
from sim.analysis.tidy import series_keys
from sim.sweeps.cli import main
from sim.sweeps.flags import build_parser, spec_from_args
from sim.sweeps.spec import SweepError, SweepSpec, expand, load_spec, parse_variant, swept_keys
from tests.sweep_fakes import GAPS, MODE_GAP, FakeRunner

PAIRS = [
    {"gossip:gossip-mode": "edges", "gossip:topology": "ring"},
    {"gossip:gossip-mode": "matching", "gossip:topology": "torus"},
]


def spec_with_pairs():
    spec = SweepSpec(grid={"strategy": ["fedavg", "gossip"], "eps": [2], "seed": [7]}, nodes=9)
    for pair in PAIRS:
        spec.vary(pair)
    return spec


def test_variants_multiply_the_grid_and_reach_only_their_strategy():
    cells = expand(spec_with_pairs())
    assert [c.id for c in cells] == [
        "fedavg-eps2-seed7",  # both variants reduce to nothing for fedavg: one cell
        "gossip-eps2-seed7-gossip-mode-edges-topology-ring",
        "gossip-eps2-seed7-gossip-mode-matching-topology-torus",
    ]
    assert "topology" not in cells[0].params
    assert cells[2].params["gossip-mode"] == "matching" and cells[2].params["topology"] == "torus"
    assert cells[2].coords["topology"] == "torus"


def test_variant_keys_are_swept_keys_and_series_keys():
    spec = spec_with_pairs()
    assert swept_keys(spec) == ["strategy", "eps", "seed", "gossip-mode", "topology"]
    manifest = spec.to_dict()
    assert manifest["variants"] == PAIRS
    assert series_keys(manifest) == ["strategy", "gossip-mode", "topology"]
    assert "variants" not in SweepSpec().to_dict()  # old manifests stay as they were


def test_set_overrides_a_variant_key_and_duplicates_collapse():
    spec = spec_with_pairs().set("gossip-mode", "metropolis")
    assert spec.variants == [{"gossip:topology": "ring"}, {"gossip:topology": "torus"}]
    spec.set("topology", "ring")
    assert spec.variants == []
    assert [c.id for c in expand(spec)] == ["fedavg-eps2-seed7", "gossip-eps2-seed7"]


def test_variant_values_are_checked_like_any_cell():
    spec = SweepSpec(grid={"strategy": ["gossip"]}).vary({"gossip:topology": "moebius"})
    with pytest.raises(SweepError, match="topology='moebius' is not valid"):
        expand(spec)
    with pytest.raises(SweepError, match="one value per key"):
        SweepSpec().vary({"topology": ["ring", "torus"]})
    with pytest.raises(SweepError, match="at least one"):
        SweepSpec().vary({})


def test_spec_toml_and_cli_give_the_same_variants(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(
        "nodes = 9\n[grid]\nstrategy = ['fedavg', 'gossip']\neps = [2]\nseed = [7]\n"
        "[[variants]]\n[variants.gossip]\ngossip-mode = 'edges'\ntopology = 'ring'\n"
        "[[variants]]\n'gossip:gossip-mode' = 'matching'\n'gossip:topology' = 'torus'\n"
    )
    from_toml = load_spec(path)
    assert from_toml.variants == PAIRS
    argv = ["run", "--strategies", "fedavg,gossip", "--eps", "2", "--seeds", "7", "--nodes", "9"]
    for pair in PAIRS:
        argv += ["--variant", " ".join(f"{k}={v}" for k, v in pair.items())]
    from_cli = spec_from_args(build_parser().parse_args(argv))
    assert [c.id for c in expand(from_cli)] == [c.id for c in expand(from_toml)]
    assert parse_variant("gossip-edges=5 lr=0.1") == {"gossip-edges": 5, "lr": 0.1}
    with pytest.raises(SweepError, match="--variant"):
        parse_variant("lr")


def test_topology_gaps_are_per_mode_not_averaged_over_a_graph(tmp_path):
    out = tmp_path / "mix"
    argv = ["run", "--strategies", "gossip", "--eps", "inf", "--seeds", "7", "--rounds", "2"]
    argv += ["--nodes", "9", "--out", str(out)]
    for mode, topology in (("edges", "ring"), ("matching", "ring"), ("matching", "torus")):
        argv += ["--variant", f"gossip:gossip-mode={mode} gossip:topology={topology}"]
    assert main(argv, runner=FakeRunner()) == 0
    data = SweepData.load(out)
    gaps = bar_gaps(data.finals, data.cells, ["topology", "gossip-mode"])
    assert gaps == {
        ("ring", "edges"): pytest.approx(GAPS["ring"] * MODE_GAP["edges"]),
        ("ring", "matching"): pytest.approx(GAPS["ring"]),
        ("torus", "matching"): pytest.approx(GAPS["torus"]),
    }
