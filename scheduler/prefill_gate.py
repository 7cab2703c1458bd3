"""Under the priority policy, a step that computes an urgent prompt carries no bulk prompt work
of lower priority.

A prompt's time to first token is the rest of the step it arrives during plus the steps it
is computed in, and a step's time grows with its prompt tokens: on a 2-core CPU one step of
256 batch-prompt tokens takes most of a second (BENCHMARKS.md, issue 11). So in a step in
which a prompt of priority p is computed, prompt work (prompt chunks, recomputation after a
preemption) of a worse priority that also ranks below it waits for a later step; decodes
always run, and prompts of one priority share steps as before. Ranks age
(`--priority-aging-s`), so a prompt that has waited long enough to outrank newer, nominally
better ones is not held back by them: nothing starves.
"""

from typing import Callable

from scheduler.request import Request


class PrefillGate:
    def __init__(self, rank: Callable[[Request], tuple], enabled: bool):
        self.rank = rank
        self.enabled = enabled
        self._best_rank: dict[int, tuple] = {}  # by priority: the best rank of this step's prompt work

    def begin_step(self) -> None:
        self._best_rank.clear()

    def holds_back(self, request: Request) -> bool:
        """Whether `request`'s work waits this step; if it does not and is prompt work, the
        step now holds it."""
        if not self.enabled or is_decode(request):
            return False
        rank = self.rank(request)
        if any(priority < request.priority and best < rank for priority, best in self._best_rank.items()):
            return True
        best = self._best_rank.get(request.priority)
        self._best_rank[request.priority] = rank if best is None else min(best, rank)
        return False


def is_decode(request: Request) -> bool:
    """Whether this step's work for `request` is one output token (the rest is prompt work);
    under async scheduling that token may be the one still in flight."""
    return request.num_tokens + request.num_pending_tokens - request.num_computed_tokens == 1 and \
        request.num_computed_tokens >= request.num_prompt_tokens
