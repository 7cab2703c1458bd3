"""Under the priority policy, a step that computes an urgent prompt carries no bulk prompt work
of lower priority.

A prompt's time to first token is the rest of the step it arrives during plus the steps it
is computed in, and a step's time grows with its prompt tokens: on a 2-core CPU one step of
256 batch-prompt tokens takes most of a second (BENCHMARKS.md, issue 11). So in a step in
which a prompt at rank level L is computed, prompt work (prompt chunks, recomputation after
a preemption) at level L + 1 or worse waits for a later step; decodes always run, and
prompts of one level share steps as before. Levels are the rank's first term, aging
included, so a prompt that has waited `--priority-aging-s` longer per level is not held back
by later, nominally better ones: nothing starves.
"""

from typing import Callable

from scheduler.request import Request


class PrefillGate:
    def __init__(self, rank: Callable[[Request], tuple], enabled: bool):
        self.rank = rank
        self.enabled = enabled
        self.level: float | None = None  # the best level whose prompt work this step holds

    def begin_step(self) -> None:
        self.level = None

    def holds_back(self, request: Request) -> bool:
        """Whether `request`'s work waits this step; if it does not and is prompt work, the
        step now holds prompt work of its level."""
        if not self.enabled or is_decode(request):
            return False
        level = self.rank(request)[0]
        if self.level is not None and level >= self.level + 1:
            return True
        self.level = level if self.level is None else min(self.level, level)
        return False


def is_decode(request: Request) -> bool:
    """Whether this step's work for `request` is one output token (the rest is prompt work)."""
    return request.num_tokens - request.num_computed_tokens == 1 and \
        request.num_computed_tokens >= request.num_prompt_tokens
