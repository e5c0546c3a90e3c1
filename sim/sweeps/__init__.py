"""Privacy sweeps: grid specs and presets, the resumable runner, the fl-sweep CLI."""
