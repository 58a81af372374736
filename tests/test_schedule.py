import json

import pytest

from attnreuse import Schedule, as_schedule


def test_construct_repr_len_and_equality():
    s = Schedule([1, 1, 0, 0, 1, 0])
    assert repr(s) == "Schedule('110010')"
    assert len(s) == 6
    assert s == Schedule("110010") == [1, 1, 0, 0, 1, 0]
    assert list(s) == [1, 1, 0, 0, 1, 0]
    assert s.num_reuse == 3


def test_hurry_is_compute_then_reuse():
    assert Schedule.hurry(6, 2) == Schedule("111100")
    assert Schedule.hurry(20, 10).bits == (1,) * 10 + (0,) * 10
    assert Schedule.hurry(5, 0) == Schedule.all_compute(5)
    for n, r, message in [(5, 5, "HURRY needs 0 <= reuse_steps < num_steps"), (5, -1, "reuse_steps must be at least 0"),
                          (0, 0, "num_steps must be at least 1")]:
        with pytest.raises(ValueError, match=message):
            Schedule.hurry(n, r)


@pytest.mark.parametrize("bits, message", [
    ([0, 1, 1], "first step of a schedule must compute"),
    ("0110", "first step of a schedule must compute"),
    ([1, 2, 0], "entry 1 is 2"),
    ([1, 0.5], "entry 1 is 0.5"),
    ("11x0", "entry 2 is 'x'"),
    ([1, True], "entry 1 is True"),
    ([], "at least one step"),
])
def test_bad_schedules_name_the_problem(bits, message):
    with pytest.raises(ValueError, match=message):
        Schedule(bits)


def test_json_round_trip(tmp_path):
    s = Schedule("1110100", meta={"strategy": "phast", "psnr": 27.2}).at_timesteps(range(900, 200, -100))
    for source in (s.to_json(), json.loads(s.to_json())):
        back = Schedule.from_json(source)
        assert back == s and back.timesteps == s.timesteps and back.meta == s.meta
    path = tmp_path / "s.json"
    s.to_json(path)
    assert Schedule.from_json(path) == s
    assert Schedule.from_json(str(path)).meta["strategy"] == "phast"
    assert as_schedule(str(path)) == s
    assert Schedule.from_json("[1, 0, 0]") == Schedule("100")
    with pytest.raises(ValueError, match="not a plan .* or a schedule"):
        Schedule.from_json('{"bits": [1]}')


def test_as_schedule_accepts_the_cli_forms():
    assert as_schedule("hurry:8:3") == Schedule.hurry(8, 3)
    assert as_schedule("1101") == Schedule("1101")
    assert as_schedule([1, 0]) == Schedule("10")
    assert as_schedule("hurry:3", num_steps=8) == Schedule.hurry(8, 3)
    with pytest.raises(ValueError, match="hurry:NUM_STEPS:REUSE_STEPS"):
        as_schedule("hurry:8")
    with pytest.raises(ValueError, match="hurry:NUM_STEPS:REUSE_STEPS"):
        as_schedule("hurry:a:b")
    with pytest.raises(TypeError):
        as_schedule(3)


def test_expand_to_second_order_samplers():
    # Heun calls the model twice per step except the last: 2 * (N - 1) + 1 calls
    s = Schedule("11100")
    assert s.expand(5) is s
    assert s.expand(9, order=2) == Schedule("111111000")
    assert Schedule("1101").expand(7, order=2) == Schedule("1111001")
    with pytest.raises(ValueError, match=r"length 9 \(one per model call\) or 5 \(one per sampler step\)"):
        Schedule("1110").expand(9, order=2)
    with pytest.raises(ValueError, match="has 4 entries but this generation makes 6 denoiser calls"):
        Schedule("1110").expand(6)


def test_schedule_moves_between_step_counts_by_timestep():
    ddim20 = [951 - 50 * i for i in range(20)]  # DDIM 'leading' timesteps of SD, 20 steps
    phast = Schedule([1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]).at_timesteps(ddim20)
    assert phast.for_timesteps(ddim20) == phast
    ts25 = [961 - 40 * i for i in range(25)]
    moved = phast.for_timesteps(ts25)
    assert len(moved) == 25 and moved.timesteps == tuple(float(t) for t in ts25)
    for bit, t in zip(moved, ts25):  # each new step follows the nearest source step
        nearest = min(range(20), key=lambda i: abs(ddim20[i] - t))
        assert bit == phast[nearest]
    assert abs(moved.num_reuse / 25 - phast.num_reuse / 20) < 0.1
    with pytest.raises(ValueError, match="has no timesteps"):
        Schedule("110").for_timesteps([900, 500, 100])
    with pytest.raises(ValueError, match="needs 3 timesteps"):
        Schedule("110").at_timesteps([1, 2])
