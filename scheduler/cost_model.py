"""What a step costs, in seconds, fitted online from the steps the engine measured.

A step's time is close to linear in what it does (the model's matmuls grow with the
tokens computed, attention with the KV read, and every step pays a fixed overhead):

    seconds = base + prefill_token * prefill tokens + decode_seq * decode sequences
                   + context_token * context tokens read

The engine times each step and calls `observe`; the coefficients are a least-squares
fit of the relative error (each step weighted by one over its predicted time squared: a
60 ms decode step matters as much as a 2 s prefill step, and TPOT is made of the former;
weighting by the measured time instead would favour the steps that happened to run fast,
and fit the mean low by about the noise's variance, ~9% at this host's noise), in
which old steps fade (a half-life in steps), regularised toward a prior, so a term the
recent steps did not exercise (no prefill for a while, say) keeps its last value instead
of drifting. The slo policy asks it how long a queue of prompts takes
and how many prompt tokens fit a step under a TPOT target; the simulator (issue 12)
replays a workload with it; operators see its coefficients and its error in /metrics.
"""

from dataclasses import asdict, dataclass
import json
import math
from pathlib import Path

# The features are scaled so the normal equations stay well conditioned: a step has
# ~1 overhead, ~10^3 prompt tokens, ~10^2 decodes and ~10^5 context tokens.
_SCALES = (1.0, 1e3, 1e2, 1e5)


@dataclass(frozen=True, slots=True)
class StepShape:
    """The work of one step, as the cost model sees it."""

    prefill_tokens: int = 0  # tokens computed for prompts (and recomputed outputs)
    decode_seqs: int = 0  # sequences that compute one token past their prompt
    context_tokens: int = 0  # KV positions the step's attention reads, over all its sequences

    def features(self) -> tuple[float, ...]:
        raw = (1.0, self.prefill_tokens, self.decode_seqs, self.context_tokens)
        return tuple(value / scale for value, scale in zip(raw, _SCALES))


@dataclass(frozen=True, slots=True)
class Coefficients:
    base_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_token_s: float

    def scaled(self) -> list[float]:
        values = (self.base_s, self.prefill_token_s, self.decode_seq_s, self.context_token_s)
        return [value * scale for value, scale in zip(values, _SCALES)]

    @classmethod
    def from_scaled(cls, values: list[float]) -> "Coefficients":
        return cls(*(value / scale for value, scale in zip(values, _SCALES)))


# SmolLM2-135M in float32 on 2 AVX-512 cores: a starting point until steps are measured.
CPU_PRIOR = Coefficients(base_s=0.004, prefill_token_s=0.0004, decode_seq_s=0.0006, context_token_s=2e-7)


class StepCostModel:
    def __init__(self, prior: Coefficients = CPU_PRIOR, half_life_steps: float = 500.0,
                 prior_weight: float = 1e-6, min_observed: int = 8):
        self.prior = prior
        self.decay = 0.5 ** (1.0 / half_life_steps)
        self.prior_weight = prior_weight
        self.min_observed = min_observed  # below this many steps, predictions come from the prior
        self.num_observed = 0
        self._error_sum = 0.0  # of predictions made just before each step was observed, decayed
        self._error_weight = 0.0
        n = len(_SCALES)
        self._xtx = [[0.0] * n for _ in range(n)]
        self._xty = [0.0] * n
        self._weight = 0.0  # the decayed sum of the observed steps' weights
        self._fitted: Coefficients | None = prior

    @property
    def is_calibrated(self) -> bool:
        return self.num_observed >= self.min_observed

    @property
    def mean_relative_error(self) -> float:
        """How far off the predictions made just before each step ran were, recent steps weighing more."""
        return self._error_sum / self._error_weight if self._error_weight else 0.0

    @property
    def coefficients(self) -> Coefficients:
        if self._fitted is None:
            self._fitted = self._solve()
        return self._fitted

    def predict(self, shape: StepShape) -> float:
        weights = self.coefficients.scaled()
        return sum(w * x for w, x in zip(weights, shape.features()))

    def observe(self, shape: StepShape, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        scale = seconds  # until calibrated, the prior's predictions may be far off
        if self.is_calibrated:
            scale = self.predict(shape)
            if seconds > 0:
                error = abs(scale - seconds) / seconds
                self._error_sum = self.decay * self._error_sum + error
                self._error_weight = self.decay * self._error_weight + 1.0
        x = shape.features()
        weight = 1.0 / max(scale, 1e-4) ** 2
        for i, xi in enumerate(x):
            row = self._xtx[i]
            for j, xj in enumerate(x):
                row[j] = self.decay * row[j] + weight * xi * xj
            self._xty[i] = self.decay * self._xty[i] + weight * xi * seconds
        self._weight = self.decay * self._weight + weight
        self.num_observed += 1
        self._fitted = None

    def _solve(self) -> Coefficients:
        """Ridge toward the prior, and no negative coefficient: a term fitted below zero is
        pinned at zero and the rest refitted (a step never gets faster by doing more)."""
        if not self.is_calibrated:
            return self.prior
        prior = self.prior.scaled()
        ridge = self.prior_weight * max(self._weight, 1.0)
        free = list(range(len(prior)))
        values = [0.0] * len(prior)
        while free:
            matrix = [[self._xtx[i][j] + (ridge if i == j else 0.0) for j in free] for i in free]
            rhs = [self._xty[i] + ridge * prior[i] for i in free]
            solution = _solve_linear(matrix, rhs)
            negative = [index for index, value in zip(free, solution) if value < 0]
            if not negative:
                for index, value in zip(free, solution):
                    values[index] = value
                break
            free = [index for index in free if index not in negative]
        return Coefficients.from_scaled(values)

    # -- questions the scheduler asks ------------------------------------------------

    def prefill_tokens_within(self, seconds: float, decode_seqs: int, context_tokens: int) -> int:
        """The most prompt tokens a step with these decodes can add and still take `seconds`."""
        c = self.coefficients
        left = seconds - c.base_s - c.decode_seq_s * decode_seqs - c.context_token_s * context_tokens
        if left <= 0:
            return 0
        if c.prefill_token_s <= 0:
            return 1 << 30
        return int(left / c.prefill_token_s)

    def work_seconds(self, num_prompt_tokens: int, num_output_tokens: int, num_context_tokens: int = 0) -> float:
        """A request's own share of the steps that serve it: its prompt tokens, then one decode
        per output token reading a context that grows from `num_context_tokens` on."""
        c = self.coefficients
        mean_context = num_context_tokens + num_prompt_tokens + num_output_tokens / 2
        return (c.prefill_token_s * num_prompt_tokens
                + num_output_tokens * (c.decode_seq_s + c.context_token_s * mean_context))

    def to_json(self) -> dict:
        return {"coefficients": asdict(self.coefficients), "num_observed": self.num_observed,
                "mean_relative_error": self.mean_relative_error}

    @classmethod
    def from_json(cls, document: dict, **kwargs) -> "StepCostModel":
        """A model that predicts with saved coefficients (from `iterserve calibrate`) from the
        first step, refined online from there."""
        kwargs.setdefault("min_observed", 0)
        return cls(prior=Coefficients(**document["coefficients"]), **kwargs)


def load_cost_model(path: str | Path) -> StepCostModel:
    """A model saved with `save_cost_model` (by `iterserve calibrate`); ValueError names the file."""
    try:
        return StepCostModel.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a cost model saved by `iterserve calibrate`: {error}") from None


def save_cost_model(cost_model: StepCostModel, path: str | Path, **context) -> None:
    """The coefficients, and whatever `context` says of where they were measured."""
    Path(path).write_text(json.dumps({**cost_model.to_json(), **context}, indent=2) + "\n")


def _solve_linear(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting, for the few unknowns of the fit."""
    n = len(rhs)
    rows = [row[:] + [value] for row, value in zip(matrix, rhs)]
    for column in range(n):
        pivot = max(range(column, n), key=lambda r: abs(rows[r][column]))
        rows[column], rows[pivot] = rows[pivot], rows[column]
        if rows[column][column] == 0.0:
            continue
        for r in range(column + 1, n):
            factor = rows[r][column] / rows[column][column]
            for c in range(column, n + 1):
                rows[r][c] -= factor * rows[column][c]
    solution = [0.0] * n
    for r in range(n - 1, -1, -1):
        if rows[r][r] == 0.0:
            continue
        solution[r] = (rows[r][n] - sum(rows[r][c] * solution[c] for c in range(r + 1, n))) / rows[r][r]
    return solution
