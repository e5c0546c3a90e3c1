"""A mock Flower Grid: node ids, and the registration times strategies order them by."""

from datetime import UTC, datetime, timedelta
from unittest.mock import Mock

from flwr.proto.node_pb2 import NodeInfo  # the type Grid.get_nodes returns


def mock_grid(node_ids):
    """Nodes registered in the order given, one millisecond apart."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    grid = Mock()
    grid.get_node_ids.return_value = set(node_ids)  # Flower's order: whatever a set gives
    grid.get_nodes.return_value = [
        NodeInfo(node_id=n, registered_at=(start + timedelta(milliseconds=i)).isoformat())
        for i, n in enumerate(node_ids)
    ]
    return grid
