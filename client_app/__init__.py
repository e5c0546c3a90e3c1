"""Flower ClientApp: DP-SGD training on the node's own shard."""
