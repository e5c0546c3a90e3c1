"""The harness: launchers, sweeps, analysis and benchmarks.

The app (flower_app, client_app, server_app, strategies) never imports it.
"""
