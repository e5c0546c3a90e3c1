"""fl-bench: where the time of private federated training goes, as ratios from one run."""
