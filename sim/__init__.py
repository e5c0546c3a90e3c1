"""Privacy sweeps on Flower's simulation engine, tidy results, plots, benchmarks."""
