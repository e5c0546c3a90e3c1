"""`fl-sweep tune` with a fake runner: it chooses by validation, never by test."""

import json
import math

import pytest
from sweep_fakes import FakeRunner, Killed

from sim.sweeps.cli import main

# The fake's two data sets disagree on purpose: on validation lr=0.5 wins for FedAvg and
# lr=0.1 for gossip; on the test set lr=2.0 would win for both.
VALIDATION = {
    ("fedavg", 0.1): 0.70,
    ("fedavg", 0.5): 0.80,
    ("fedavg", 2.0): 0.60,
    ("gossip", 0.1): 0.75,
    ("gossip", 0.5): 0.65,
    ("gossip", 2.0): 0.55,
}
TEST = {
    ("fedavg", 0.1): 0.50,
    ("fedavg", 0.5): 0.55,
    ("fedavg", 2.0): 0.95,
    ("gossip", 0.1): 0.50,
    ("gossip", 0.5): 0.55,
    ("gossip", 2.0): 0.95,
}


def score(cfg, r):
    table = VALIDATION if cfg.evaluate_on == "validation" else TEST
    acc = table[(cfg.strategy, cfg.lr)]
    if cfg.strategy == "gossip" and cfg.gossip_steps == 4:
        acc += 0.01  # more gossip helps a little, on both sets
    if math.isfinite(cfg.eps) and cfg.max_grad_norm == 0.2:
        acc += 0.02
    return round(acc * (1 - 0.5**r) + 0.001 * (cfg.seed - 7), 4)


ARGV = [
    "tune",
    "--strategies",
    "fedavg,gossip",
    "--eps",
    "inf,2",
    "--seeds",
    "7,8,9",
    "--rounds",
    "3",
    "--nodes",
    "3",
    "--set",
    "validation-samples=500",
    "--search",
    "lr=0.1,0.5,2.0",
    "--search",
    "max-grad-norm=0.2,1.0",
    "--search",
    "gossip:gossip-steps=1,4",
]


def test_tune_chooses_by_validation_and_runs_the_choice_with_every_seed_on_test(tmp_path):
    out = tmp_path / "t"
    runner = FakeRunner(score=score)
    assert main([*ARGV, "--out", str(out)], runner=runner) == 0
    search = [c for c in runner.configs if c.evaluate_on == "validation"]
    final = [c for c in runner.configs if c.evaluate_on == "test"]
    # Without DP max-grad-norm does nothing and is not searched.
    assert len(search) == 3 + 3 * 2 + 3 * 2 + 3 * 2 * 2
    assert all(c.seed == 7 for c in search)
    assert len(final) == 4 * 3 and sorted({c.seed for c in final}) == [7, 8, 9]
    assert all(c.validation_samples == 500 for c in runner.configs)
    assert runner.configs.index(final[0]) == len(search), "a final run before the choice"
    choices = {g["group"]: g for g in json.loads((out / "tune.json").read_text())["groups"]}
    assert choices["fedavg-epsinf"]["chosen"] == {"lr": 0.5}
    assert choices["fedavg-eps2"]["chosen"] == {"lr": 0.5, "max-grad-norm": 0.2}
    assert choices["gossip-epsinf"]["chosen"] == {"lr": 0.1, "gossip-steps": 4}
    assert choices["gossip-eps2"]["chosen"] == {"lr": 0.1, "max-grad-norm": 0.2, "gossip-steps": 4}
    assert choices["fedavg-eps2"]["validation_accuracy"] == pytest.approx(0.82 * 0.875)
    assert len(choices["gossip-eps2"]["candidates"]) == 12
    for c in final:  # every final run has its cell's choice, never the test set's favourite
        assert c.lr == (0.5 if c.strategy == "fedavg" else 0.1)
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    ids = [c["id"] for c in manifest["cells"]]
    assert "fedavg-eps2-seed9" in ids and len(ids) == 12
    assert manifest["cells"][ids.index("fedavg-eps2-seed9")]["params"]["max-grad-norm"] == 0.2
    report = (out / "tune.md").read_text()
    assert "spends privacy that no ε here counts" in report
    assert "lr=0.5 max-grad-norm=0.2" in report
    assert "## At equal communication" in report
    assert (out / "final" / "figures" / "accuracy_vs_bytes.png").is_file()
    assert (out / "final" / "report.md").is_file()


def test_an_interrupted_tune_resumes_without_rerunning_or_changing_its_choice(tmp_path):
    out = tmp_path / "t"
    argv = [*ARGV, "--out", str(out)]
    with pytest.raises(Killed):
        main(argv, runner=FakeRunner(score=score, kill_at=5, kill_mid=True))
    assert not (out / "tune.json").exists()
    runner = FakeRunner(score=score)
    assert main(argv, runner=runner) == 0
    assert len(runner.calls) == 27 - 4 + 12
    first = (out / "tune.json").read_text()
    again = FakeRunner(score=score)
    assert main(argv, runner=again) == 0
    assert again.calls == [] and (out / "tune.json").read_text() == first


def test_a_failed_search_run_stops_before_anything_is_chosen(tmp_path, capsys):
    out = tmp_path / "t"
    runner = FakeRunner(score=score, fail={"fedavg-eps2-seed7-lr0.5-max-grad-norm0.2"})
    assert main([*ARGV, "--out", str(out)], runner=runner) == 1
    assert not (out / "tune.json").exists() and not (out / "final").exists()
    assert all(c.evaluate_on == "validation" for c in runner.configs)
    assert "re-run the same command to retry them" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--search", "eps=1,2"], "eps is not a hyperparameter to tune"),
        (["--set", "validation-samples=0"], "needs a validation split"),
        (["--search", "lr=0.1", "--sweep", "lr=0.1,0.2"], "lr is already swept"),
        (["--search", "local-steps=-1"], "local-steps=-1 is not valid"),
    ],
)
def test_bad_tune_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "t"
    argv = list(ARGV)
    if "validation-samples=0" in extra:  # replaces ARGV's own (two flags may not give one key)
        i = argv.index("validation-samples=500")
        del argv[i - 1 : i + 1]
    assert main([*argv, *extra, "--out", str(out)], runner=FakeRunner(score=score)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_the_reference_tuned_preset_is_valid_and_only_a_tune_preset(capsys):
    assert main(["tune", "--preset", "reference-tuned", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # fedavg: 3 (inf) + 3 × 6; gossip: 3 × 2 × 2 (inf) + 3 × 6 × 4
    assert "105 search runs on 20 nodes, then 24 final runs" in out
    with pytest.raises(SystemExit):
        main(["run", "--preset", "reference-tuned", "--dry-run"])
