"""The persistent batch: each running request's block table, kept in one array across steps.

A request's block list only grows while it runs, so a step writes just the blocks added
since the last one; everything else a step needs (positions, slots, the step's block
tables, sequence lengths) is computed from these rows by vectorised numpy, not rebuilt
from Python lists. A request's row is given back when it finishes or is preempted (its
blocks then change), which the engine reports through `forget`.
"""

import numpy as np

from scheduler import ScheduledRequest


class InputBatch:
    def __init__(self, block_size: int, num_rows: int = 64, num_columns: int = 64):
        self.block_size = block_size
        # Columns past a row's count keep an earlier occupant's block ids: valid blocks that
        # no step reads, because every length bounds what it reads.
        self.block_table = np.zeros((num_rows, num_columns), dtype=np.int32)
        self.num_blocks = np.zeros(num_rows, dtype=np.int64)
        self._rows: dict[str, int] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    @property
    def num_requests(self) -> int:
        return len(self._rows)

    def rows(self, scheduled: list[ScheduledRequest]) -> np.ndarray:
        """The rows of `scheduled`, in order, with their tables brought up to date."""
        rows = np.empty(len(scheduled), dtype=np.int64)
        for index, item in enumerate(scheduled):
            request_id = item.request.request_id
            row = self._rows.get(request_id)
            if row is None:
                row = self._rows[request_id] = self._take_row()
                self.num_blocks[row] = 0
            known, block_ids = self.num_blocks[row], item.block_ids
            if len(block_ids) > known:
                if len(block_ids) > self.block_table.shape[1]:
                    self._grow(columns=len(block_ids))
                self.block_table[row, known:len(block_ids)] = block_ids[known:]
                self.num_blocks[row] = len(block_ids)
            rows[index] = row
        return rows

    def forget(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def slot_mapping(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The cache slot of each token: `rows[i]`'s token at `positions[i]`."""
        block_size = self.block_size
        return self.block_table[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size

    def tables(self, rows: np.ndarray, width: int | None = None, pad: int | None = None) -> np.ndarray:
        """int32 [len(rows), width (by default the most blocks among them)]: the rows' block
        tables. Past a row's own blocks: `pad` where given, else ids no step reads."""
        counts = self.num_blocks[rows]
        if width is None:
            width = int(counts.max()) if len(rows) else 1
        if pad is None and width <= self.block_table.shape[1]:
            return self.block_table[rows, :width]
        tables = np.full((len(rows), width), 0 if pad is None else pad, dtype=np.int32)
        columns = min(width, self.block_table.shape[1])
        tables[:, :columns] = self.block_table[rows, :columns]
        if pad is not None:
            tables[np.arange(width) >= counts[:, None]] = pad
        return tables

    def _take_row(self) -> int:
        if not self._free:
            self._grow(rows=2 * len(self.num_blocks))
        return self._free.pop()

    def _grow(self, rows: int | None = None, columns: int | None = None) -> None:
        old_rows, old_columns = self.block_table.shape
        new_rows = max(rows or 0, old_rows)
        new_columns = max(2 * old_columns, columns) if columns else old_columns
        table = np.zeros((new_rows, new_columns), dtype=np.int32)
        table[:old_rows, :old_columns] = self.block_table
        self.block_table = table
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros(new_rows - old_rows, dtype=np.int64)])
        self._free.extend(range(new_rows - 1, old_rows - 1, -1))


def step_positions(starts: np.ndarray, num_new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sequences that compute `num_new[s]` tokens from `starts[s]`: (query_start_loc
    [len + 1], the sequence of each token, each token's position)."""
    query_start_loc = np.zeros(len(num_new) + 1, dtype=np.int64)
    np.cumsum(num_new, out=query_start_loc[1:])
    sequence = np.repeat(np.arange(len(num_new)), num_new)
    positions = np.arange(query_start_loc[-1]) - query_start_loc[sequence] + starts[sequence]
    return query_start_loc, sequence, positions


def known_token(scheduled: ScheduledRequest) -> int:
    """A decode's input token; 0 as a stand-in when the step in flight has yet to sample it
    (async scheduling: the engine writes it in on the device)."""
    request, position = scheduled.request, scheduled.start_position
    return request.all_token_ids[position] if position < request.num_tokens else 0
