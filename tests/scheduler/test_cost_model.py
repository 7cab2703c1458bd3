"""The step cost model: it recovers a linear step time from observed steps, keeps unexercised
terms at their prior, never goes negative, forgets old steps, and round-trips through JSON."""

import random

import pytest

from scheduler import StepCostModel, StepShape
from scheduler.cost_model import Coefficients

TRUE = Coefficients(base_s=0.012, prefill_token_s=0.0003, decode_seq_s=0.0015, context_token_s=4e-7)


def true_seconds(shape: StepShape, coefficients: Coefficients = TRUE) -> float:
    return (coefficients.base_s + coefficients.prefill_token_s * shape.prefill_tokens
            + coefficients.decode_seq_s * shape.decode_seqs + coefficients.context_token_s * shape.context_tokens)


def random_shape(rng: random.Random) -> StepShape:
    decodes = rng.randint(0, 64)
    return StepShape(rng.choice([0, rng.randint(1, 2048)]), decodes, decodes * rng.randint(16, 2048))


def test_it_recovers_the_coefficients_of_a_linear_step_time():
    rng = random.Random(0)
    model = StepCostModel()
    for _ in range(300):
        shape = random_shape(rng)
        model.observe(shape, true_seconds(shape) * rng.uniform(0.97, 1.03))
    fitted = model.coefficients
    for name in ("base_s", "prefill_token_s", "decode_seq_s", "context_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.1), name
    shape = StepShape(512, 32, 32 * 700)
    assert model.predict(shape) == pytest.approx(true_seconds(shape), rel=0.03)
    assert model.mean_relative_error < 0.05


@pytest.mark.parametrize("noise", ["lognormal", "one step in ten twice as long"])
def test_under_noise_it_predicts_the_mean_step_time_not_a_low_one(noise):
    """What a simulation needs: a queue of steps lasts the sum of their mean times."""
    rng = random.Random(1)
    model = StepCostModel()
    for _ in range(3000):
        shape = random_shape(rng)
        if noise == "lognormal":
            factor = rng.lognormvariate(0, 0.2) / 1.0202  # mean 1
        else:
            factor = 2.0 if rng.random() < 0.1 else 0.8 / 0.9  # mean 1
        model.observe(shape, true_seconds(shape) * factor)
    for shape in (StepShape(0, 8, 8 * 300), StepShape(64, 16, 16 * 500), StepShape(1024, 48, 48 * 900)):
        assert model.predict(shape) == pytest.approx(true_seconds(shape), rel=0.03)


def test_before_enough_steps_it_predicts_from_the_prior():
    model = StepCostModel(min_observed=8)
    for _ in range(7):
        model.observe(StepShape(100, 0, 100), 1.0)
    assert not model.is_calibrated and model.coefficients == model.prior
    model.observe(StepShape(100, 0, 100), 1.0)
    assert model.is_calibrated and model.coefficients != model.prior


def test_a_term_no_step_exercised_keeps_its_prior():
    model = StepCostModel()
    rng = random.Random(1)
    for _ in range(100):  # decodes only: nothing says what a prompt token costs
        decodes = rng.randint(1, 64)
        shape = StepShape(0, decodes, decodes * rng.randint(16, 512))
        model.observe(shape, true_seconds(shape))
    assert model.coefficients.prefill_token_s == pytest.approx(model.prior.prefill_token_s, rel=1e-6)
    assert model.coefficients.decode_seq_s == pytest.approx(TRUE.decode_seq_s, rel=0.05)


def test_no_coefficient_is_fitted_below_zero():
    model = StepCostModel()
    rng = random.Random(2)
    for _ in range(200):  # steps that get faster with more context: noise a fit must not believe
        shape = random_shape(rng)
        model.observe(shape, max(1e-4, 0.01 + 0.0002 * shape.prefill_tokens - 1e-7 * shape.context_tokens))
    fitted = model.coefficients
    assert fitted.context_token_s == 0.0
    assert min(fitted.base_s, fitted.prefill_token_s, fitted.decode_seq_s) >= 0.0


def test_old_steps_fade_so_it_follows_a_change_of_speed():
    model = StepCostModel(half_life_steps=50)
    rng = random.Random(3)
    slower = Coefficients(*(2 * value for value in (TRUE.base_s, TRUE.prefill_token_s, TRUE.decode_seq_s,
                                                    TRUE.context_token_s)))
    for coefficients in (TRUE, slower):
        for _ in range(400):
            shape = random_shape(rng)
            model.observe(shape, true_seconds(shape, coefficients))
    shape = StepShape(256, 16, 16 * 300)
    assert model.predict(shape) == pytest.approx(true_seconds(shape, slower), rel=0.05)


def test_prefill_tokens_within_inverts_the_step_time():
    model = StepCostModel(prior=TRUE, min_observed=0)
    tokens = model.prefill_tokens_within(0.05, decode_seqs=10, context_tokens=5000)
    assert true_seconds(StepShape(tokens, 10, 5000)) <= 0.05 < true_seconds(StepShape(tokens + 1, 10, 5000))
    assert model.prefill_tokens_within(0.001, decode_seqs=10, context_tokens=5000) == 0


def test_a_saved_model_predicts_as_it_did():
    rng = random.Random(4)
    model = StepCostModel()
    for _ in range(50):
        shape = random_shape(rng)
        model.observe(shape, true_seconds(shape))
    loaded = StepCostModel.from_json(model.to_json(), min_observed=0)
    shape = StepShape(300, 20, 6000)
    assert loaded.predict(shape) == pytest.approx(model.predict(shape))
    assert model.to_json()["num_observed"] == 50


def test_garbage_timings_are_ignored():
    model = StepCostModel()
    model.observe(StepShape(10, 0, 10), float("nan"))
    model.observe(StepShape(10, 0, 10), -1.0)
    assert model.num_observed == 0
