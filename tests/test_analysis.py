"""The redundancy (Fig. 2) and sensitivity (Fig. 3) analyses on the tiny random-weight pipeline."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnreuse import attention_layers
from attnreuse.eval.analysis import (
    _generate,
    _Perturber,
    _probed,
    _Recorder,
    fit_exponential,
    map_distance,
    redundancy,
    sensitivity,
)
from attnreuse.pipelines.tiny import build_pipeline

N = 4
PROMPTS = ["a red circle", "a blue square on the left"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("tiny-sd", seed=0)


def _processors(pipe):
    return dict(pipe.unet.attn_processors)


def test_map_distance_is_total_variation_by_hand():
    a = torch.tensor([[[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])
    b = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.3, 0.2]]])
    # rows: 0.5 * (1 + 1) = 1 and 0.5 * (0.3 + 0 + 0.3) = 0.3; mean 0.65
    assert map_distance(a, b) == pytest.approx(0.65)
    assert map_distance(a, a) == 0.0


def test_recorder_keeps_only_previous_map_and_records_its_distance():
    attn = SimpleNamespace(upcast_attention=False, upcast_softmax=False)
    key = torch.randn(2, 5, 4)
    queries = [torch.randn(2, 3, 4) for _ in range(3)]
    recorder = _Recorder()
    maps = [recorder("layer", attn, q, key, None, 0.5) for q in queries]
    expected = [map_distance(maps[1], maps[0]), map_distance(maps[2], maps[1])]
    assert recorder.per_layer["layer"] == pytest.approx(expected)
    assert recorder.previous["layer"] is maps[2] and len(recorder.previous) == 1
    torch.testing.assert_close(maps[0], torch.softmax(queries[0] @ key.transpose(1, 2) * 0.5, -1))


@pytest.mark.parametrize("probe", [_Recorder, lambda: _Perturber(0.3, 0, None)])
def test_probes_keep_the_images_and_restore_the_processors(pipe, probe):
    before = _processors(pipe)
    plain = _generate(pipe, PROMPTS, SEEDS, N, 7.5)
    with _probed(pipe, probe()) as state:
        probed = _generate(pipe, PROMPTS, SEEDS, N, 7.5)
        assert all(type(p).__name__ == "_ProbeProcessor" for p in pipe.unet.attn_processors.values())
    assert state.call == N
    np.testing.assert_allclose(probed, plain, atol=1e-5)
    after = _processors(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not pipe.unet._forward_pre_hooks


def test_processors_restored_after_an_error(pipe):
    before = _processors(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with _probed(pipe, _Recorder()):
            raise RuntimeError("boom")
    assert all(_processors(pipe)[k] is before[k] for k in before)
    assert not pipe.unet._forward_pre_hooks


def test_redundancy(pipe, tmp_path):
    result = redundancy(pipe, PROMPTS, SEEDS, num_inference_steps=N, out=tmp_path)
    kinds = attention_layers(pipe)
    assert result["steps"] == list(range(2, N + 1))
    assert set(result["per_layer"]) == set(kinds)
    for values in [result["self"], result["cross"], *result["per_layer"].values()]:
        assert len(values) == N - 1 and all(0.0 <= v <= 1.0 for v in values)
    selfs = [v for n, v in result["per_layer"].items() if "attn1" in n]
    np.testing.assert_allclose(result["self"], np.mean(selfs, axis=0))
    assert min(result["self"]) > 0  # the maps do move between steps
    assert result["guidance_scale"] == 7.5 and result["scheduler"] == "DDIMScheduler"
    assert result["prompts"] == PROMPTS and result["seeds"] == SEEDS and result["num_inference_steps"] == N
    assert json.loads((tmp_path / "redundancy.json").read_text())["self"] == pytest.approx(result["self"])
    assert (tmp_path / "redundancy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sensitivity_is_deterministic_and_writes_files(pipe, tmp_path):
    first = sensitivity(pipe, PROMPTS, SEEDS, N, guidance_scale=7.5, noise=0.5, out=tmp_path)
    second = sensitivity(pipe, PROMPTS, SEEDS, N, guidance_scale=7.5, noise=0.5)
    assert first["steps"] == list(range(1, N + 1))
    assert first["distance"] == second["distance"]
    assert all(0 < d <= 1 for d in first["distance"])
    assert first["fit"]["steps"] == list(range(1, N - 1))  # the last two steps are left out, as in the paper
    assert math.isfinite(first["fit"]["k2"])
    saved = json.loads((tmp_path / "sensitivity.json").read_text())
    assert saved["distance"] == first["distance"] and saved["noise"] == 0.5
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert all(p.__class__.__name__ != "_ProbeProcessor" for p in pipe.unet.attn_processors.values())


def test_sensitivity_without_noise_is_zero(pipe, tmp_path):
    result = sensitivity(pipe, PROMPTS, SEEDS, N, guidance_scale=7.5, noise=0.0, out=tmp_path)
    assert result["distance"] == [0.0] * N
    assert math.isnan(result["fit"]["k2"])  # log 0: no fit
    assert json.loads((tmp_path / "sensitivity.json").read_text())["fit"]["k2"] is None


def test_sensitivity_rejects_bad_fit_steps(pipe):
    with pytest.raises(ValueError, match="fit_steps"):
        sensitivity(pipe, PROMPTS, SEEDS, 2, guidance_scale=7.5)


def test_fit_recovers_an_exponential():
    steps = np.arange(1, 19)
    fit = fit_exponential(steps, 2 * np.exp(-0.3 * steps))
    assert fit["k1"] == pytest.approx(2.0) and fit["k2"] == pytest.approx(0.3)
    assert fit["correlation"] == pytest.approx(1.0) and fit["steps"] == list(range(1, 19))
    with pytest.raises(ValueError):
        fit_exponential([1], [0.5])


def test_analyze_command_writes_json_and_plot(tmp_path, capsys):
    from attnreuse.cli import main

    assert main(["analyze", "redundancy", "--steps", "4", "--count", "2", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert "self-attention" in capsys.readouterr().out
    result = json.loads((tmp_path / "redundancy.json").read_text())
    assert len(result["self"]) == 3 and result["guidance_scale"] == 4.5  # the default model's documented scale
    assert (tmp_path / "redundancy.png").read_bytes()[:4] == b"\x89PNG"
