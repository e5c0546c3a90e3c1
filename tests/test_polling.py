"""The ServerApp's reply polling: every reply collected, short sleeps, the timeout kept."""

from types import SimpleNamespace
from unittest.mock import Mock

from server_app.polling import SIMULATION_WINDOW, PromptGrid, collect_replies, prompt_grid


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


class WindowedGrid:
    """Replies to each pushed message on the next pull; records what was in flight."""

    def __init__(self):
        self.pushed, self.in_flight, self.peak = [], set(), 0

    def push_messages(self, messages):
        ids = [f"id-{m}" for m in messages]
        self.pushed.append(list(messages))
        self.in_flight |= set(ids)
        self.peak = max(self.peak, len(self.in_flight))
        return ids

    def pull_messages(self, pending):
        done = sorted(self.in_flight & set(pending))[:2]  # two "actors": two replies a pull
        self.in_flight -= set(done)
        return [reply_to(i) for i in done]


def test_a_window_keeps_at_most_that_many_messages_in_flight_and_sends_them_all():
    grid = WindowedGrid()
    replies = PromptGrid(grid, interval=0.0, window=5).send_and_receive(range(23), timeout=60)
    assert sorted(m.metadata.reply_to_message_id for m in replies) == sorted(
        f"id-{i}" for i in range(23)
    )
    assert grid.peak == 5
    assert [m for batch in grid.pushed for m in batch] == list(range(23))  # in order, once each
    assert grid.pushed[0] == [0, 1, 2, 3, 4] and all(len(b) <= 2 for b in grid.pushed[1:])


def test_without_a_window_every_message_is_pushed_at_once():
    grid = WindowedGrid()
    PromptGrid(grid, interval=0.0).send_and_receive(range(23), timeout=60)
    assert grid.pushed == [list(range(23))]


def test_only_simulation_gets_a_window():
    class InMemoryGrid(WindowedGrid):
        pass

    assert prompt_grid(InMemoryGrid()).window == SIMULATION_WINDOW
    assert prompt_grid(WindowedGrid()).window is None  # a deployment's grid
