"""Flower ServerApp: config, strategy, central evaluation, results."""
