"""Properties over many inputs (hypothesis): parsing either gives a valid schedule or a clear error, and the cache
holds its invariants on a tiny pipeline whatever the schedule, mode and budget."""

import json

import numpy as np
import pytest
from helpers import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnreuse import Schedule, apply_attention_reuse, as_schedule
from attnreuse.pipelines.tiny import build_pipeline

ATOMS = st.one_of(st.integers(-3, 3), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.none())
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=4)),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=9), inner, max_size=4),
                    max_leaves=12)


def _valid(schedule: Schedule) -> bool:
    return (len(schedule) > 0 and schedule.bits[0] == 1 and set(schedule.bits) <= {0, 1}
            and all(type(b) is int for b in schedule.bits))


def _parses_or_says_why(make):
    try:
        schedule = make()
    except (ValueError, TypeError) as err:
        assert str(err).strip(), "an error without a message"
        return None
    assert _valid(schedule)
    return schedule


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=12), st.lists(ATOMS, max_size=8), ATOMS, st.tuples(ATOMS, ATOMS)))
def test_any_schedule_input_parses_or_raises_a_clear_error(value):
    _parses_or_says_why(lambda: Schedule(value))
    if isinstance(value, (str, list, tuple)):
        _parses_or_says_why(lambda: as_schedule(value, num_steps=6))


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, st.fixed_dictionaries({"schedule": JSON}, optional={"timesteps": JSON, "meta": JSON})))
def test_any_schedule_json_parses_or_raises_an_error_naming_the_problem(data):
    try:
        text = json.dumps(data)
    except ValueError:
        return
    parsed = _parses_or_says_why(lambda: Schedule.from_json(text if text.lstrip().startswith(("{", "[")) else data))
    if parsed is not None and parsed.timesteps is not None:
        assert len(parsed.timesteps) == len(parsed) and all(np.isfinite(parsed.timesteps))


@settings(max_examples=200, deadline=None)
@given(st.integers(-2, 30), st.integers(-2, 30))
def test_hurry_is_valid_or_refused(n, r):
    schedule = _parses_or_says_why(lambda: Schedule.hurry(n, r))
    assert schedule is None or (len(schedule) == n and schedule.num_reuse == r)


@pytest.fixture(scope="module")
def tiny():
    return build_pipeline("tiny-sd", seed=0)


BITS = st.lists(st.integers(0, 1), min_size=3, max_size=5).map(lambda b: [1] + b)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(BITS, st.sampled_from(["map", "qk", "output", "auto"]), st.sampled_from([None, 0, 300_000, 10**9]))
def test_the_cache_is_empty_after_every_generation_and_never_above_the_budget(tiny, bits, mode, budget):
    seen = []

    def watch(pipe, i, t, kwargs):
        seen.append(handle.stats()["cache_bytes"])
        return kwargs

    with apply_attention_reuse(tiny, Schedule(bits), mode=mode, max_cache_bytes=budget) as handle:
        run(tiny, steps=len(bits), callback_on_step_end=watch)
        stats = handle.stats()
        assert stats["cache_bytes"] == 0 and not handle.tracker.in_generation
        if budget is not None:
            assert max(seen) <= budget and stats["peak_cache_bytes"] <= budget
            assert stats["kept_buffer_bytes"] <= budget


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(2, 6), st.sampled_from(["map", "qk", "output", "auto"]))
def test_an_all_compute_schedule_is_bit_identical_to_the_unpatched_pipeline(tiny, steps, mode):
    reference = run(tiny, steps=steps)
    with apply_attention_reuse(tiny, Schedule.all_compute(steps), mode=mode):
        np.testing.assert_array_equal(run(tiny, steps=steps), reference)
