"""Names a sweep folder and its analysis share, importable without pandas or matplotlib.

`fl-sweep --help` and the sweep grid read them; loading the analysis waits for a command
that analyses.
"""

TIDY = "sweep.csv"
MANIFEST = "manifest.json"
RUNS = "runs"
# Every sweep cell's core coordinates (sim.sweeps.spec names cells by them).
CORE = ("strategy", "eps", "seed")
# rounds-to-target's default target: this fraction of each strategy's non-private accuracy.
TARGET_FRACTION = 0.9
