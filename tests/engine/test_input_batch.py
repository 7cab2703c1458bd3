"""The persistent batch (engine/input_batch.py): rows that follow their requests' growing
block lists, rows given back and reused, growth past its first size, and vectorised
positions and slots equal to the per-token Python they replace."""

from dataclasses import dataclass

import numpy as np

from engine.input_batch import InputBatch, step_positions

BLOCK_SIZE = 4


@dataclass
class FakeRequest:
    request_id: str


@dataclass
class Scheduled:  # the two fields of ScheduledRequest that InputBatch reads
    request: FakeRequest
    block_ids: list[int]


def scheduled(request_id: str, block_ids: list[int]) -> Scheduled:
    return Scheduled(FakeRequest(request_id), list(block_ids))


def table_rows(batch: InputBatch, items: list[Scheduled]) -> list[list[int]]:
    """Each row of the step's tables, cut at its own block count (columns past it are unread)."""
    rows = batch.rows(items)
    tables = batch.tables(rows)
    assert tables.shape == (len(items), max(len(item.block_ids) for item in items))
    return [tables[i, :len(item.block_ids)].tolist() for i, item in enumerate(items)]


def test_rows_follow_their_requests_new_blocks_across_steps():
    batch = InputBatch(BLOCK_SIZE)
    a, b = [3, 9], [5]
    assert table_rows(batch, [scheduled("a", a), scheduled("b", b)]) == [a, b]
    a, b = a + [11], b + [2, 7]
    # Another order, and grown lists: the rows are the requests', not the positions'.
    assert table_rows(batch, [scheduled("b", b), scheduled("a", a)]) == [b, a]
    assert batch.num_requests == 2


def test_a_forgotten_row_is_given_to_the_next_request_with_its_own_blocks():
    batch = InputBatch(BLOCK_SIZE, num_rows=2)
    batch.rows([scheduled("a", [1, 2, 3, 4]), scheduled("b", [5])])
    batch.forget("a")
    batch.forget("never-seen")  # a request that never ran: nothing to give back
    assert batch.num_requests == 1
    # "c" takes a's row, and its table starts with its own block, not a's.
    assert table_rows(batch, [scheduled("c", [8]), scheduled("b", [5])]) == [[8], [5]]
    # Padded (as static decode steps pad to their scratch block), a's stale blocks are gone too.
    rows = batch.rows([scheduled("c", [8]), scheduled("b", [5])])
    assert batch.tables(rows, width=3, pad=99).tolist() == [[8, 99, 99], [5, 99, 99]]
    assert batch.tables(rows, width=100, pad=99)[:, 1:].tolist() == [[99] * 99] * 2  # wider than the array
    # A preempted request comes back with other blocks: forgotten, it is written afresh.
    batch.forget("b")
    assert table_rows(batch, [scheduled("b", [6, 0])]) == [[6, 0]]


def test_the_batch_grows_past_its_first_rows_and_columns():
    batch = InputBatch(BLOCK_SIZE, num_rows=2, num_columns=2)
    items = [scheduled(f"r{i}", list(range(i, i + 3 + i))) for i in range(5)]
    assert table_rows(batch, items) == [item.block_ids for item in items]
    items[0].block_ids += list(range(40, 60))
    assert table_rows(batch, items) == [item.block_ids for item in items]


def test_positions_and_slots_equal_the_per_token_loop():
    rng = np.random.default_rng(0)
    batch = InputBatch(BLOCK_SIZE)
    starts = rng.integers(0, 40, size=12)
    num_new = np.where(rng.random(12) < 0.5, 1, rng.integers(1, 20, size=12))
    items = [scheduled(f"r{i}", rng.permutation(100)[:-(-(s + n) // BLOCK_SIZE)].tolist())
             for i, (s, n) in enumerate(zip(starts, num_new))]
    rows = batch.rows(items)
    query_start_loc, sequence, positions = step_positions(starts, num_new)
    slots = batch.slot_mapping(rows[sequence], positions)

    expected_positions, expected_slots, expected_loc = [], [], [0]
    for item, start, count in zip(items, starts, num_new):
        for position in range(start, start + count):
            expected_positions.append(position)
            expected_slots.append(item.block_ids[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE)
        expected_loc.append(expected_loc[-1] + count)
    assert positions.tolist() == expected_positions
    assert slots.tolist() == expected_slots
    assert query_start_loc.tolist() == expected_loc
    assert sequence.tolist() == [i for i, count in enumerate(num_new) for _ in range(count)]
