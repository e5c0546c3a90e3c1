"""The ServerApp's reply polling: every reply collected, short sleeps, the timeout kept."""

from types import SimpleNamespace
from unittest.mock import Mock

from server_app.polling import PromptGrid, collect_replies


def reply_to(msg_id):
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=msg_id))


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


def scripted_pull(batches):
    """Each call returns the next batch of replies (then nothing)."""
    calls = []

    def pull(pending):
        calls.append(set(pending))
        return batches.pop(0) if batches else []

    return pull, calls


def test_collects_every_reply_and_asks_only_for_pending_ones():
    clock = FakeClock()
    pull, calls = scripted_pull([[reply_to("a")], [], [reply_to("b"), reply_to("c")]])
    got = collect_replies(
        {"a", "b", "c"}, pull, timeout=60, interval=0.2, clock=clock, sleep=clock.sleep
    )
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["a", "b", "c"]
    assert calls == [{"a", "b", "c"}, {"b", "c"}, {"b", "c"}]
    assert clock.sleeps == [0.2, 0.2]  # stops as soon as the last reply is in


def test_timeout_returns_what_arrived():
    clock = FakeClock()
    pull, calls = scripted_pull([[reply_to("a")]])
    got = collect_replies(
        {"a", "b"}, pull, timeout=1.0, interval=0.3, clock=clock, sleep=clock.sleep
    )
    assert [m.metadata.reply_to_message_id for m in got] == ["a"]
    assert clock.now == 1.0  # never sleeps past the deadline
    assert max(clock.sleeps) <= 0.3
    assert len(calls) == 5


def test_prompt_grid_pushes_then_polls_and_passes_the_rest_through():
    grid = Mock()
    grid.push_messages.return_value = ["m1", "m2"]
    grid.pull_messages.side_effect = [[reply_to("m1")], [reply_to("m2")]]
    grid.get_node_ids.return_value = [1, 2]
    prompt = PromptGrid(grid, interval=0.0)
    replies = prompt.send_and_receive(["x", "y"], timeout=5)
    assert [m.metadata.reply_to_message_id for m in replies] == ["m1", "m2"]
    grid.push_messages.assert_called_once_with(["x", "y"])
    assert prompt.get_node_ids() == [1, 2]
    grid.send_and_receive.assert_not_called()


def test_no_messages_no_round_trip():
    grid = Mock()
    assert PromptGrid(grid).send_and_receive([], timeout=5) == []
    grid.push_messages.assert_not_called()
    grid.pull_messages.assert_not_called()
