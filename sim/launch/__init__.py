"""Driving Flower processes: the flwr CLI, an owned simulation SuperLink, a local deployment."""
