"""The methods compared: each patches the pipeline and restores it; peers that cannot run say why; phast:R searches
once and reads its cached schedule after."""

import numpy as np
import pytest

from attnreuse.default_model import load_default_pipeline
from attnreuse.eval.methods import PeerUnavailable, method
from attnreuse.pipelines.sampling import GenerationSetup
from attnreuse.plan import Schedule


def _ONE(pipe, steps=4, guidance=4.5):
    return GenerationSetup(pipe, ["a red circle on the left"], [0], steps, guidance)


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


def _full(pipe, steps=4):
    with method(GenerationSetup(pipe, ["a red circle on the left"], [0], steps, 4.5), "full") as run:
        return run(_ONE(pipe))


@pytest.mark.parametrize("spec", ["deepcache:2", "tgate:2", "tome:0.5", "pab:2", "taylorseer:2", "hurry:2", "steps:3"])
def test_every_method_changes_the_images_and_leaves_the_pipeline_as_it_was(pipe, spec):
    before = _full(pipe)
    with method(_ONE(pipe), spec) as run:
        images = run(_ONE(pipe))
    assert images.shape == before.shape and not np.array_equal(images, before)
    np.testing.assert_array_equal(_full(pipe), before)


def test_peers_one_after_another_leave_the_pipeline_as_it_was(pipe):
    """diffusers' hooks, removed, leave an instance `forward` on the modules they hooked: T-GATE after them must
    still undo only its own patches (as in an eval's second round, where tgate follows taylorseer and pab)."""
    before = _full(pipe)
    for spec in ["taylorseer:2", "pab:2", "tgate:2", "tome:0.5"]:
        with method(_ONE(pipe), spec) as run:
            run(_ONE(pipe))
    np.testing.assert_array_equal(_full(pipe), before)


def test_a_peer_that_is_not_installed_says_why(pipe, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "DeepCache", None)  # as if the package were missing
    with pytest.raises(PeerUnavailable, match="DeepCache is not installed"):
        with method(_ONE(pipe), "deepcache:2"):
            pass


@pytest.mark.parametrize("spec", ["fbc:0.05", "fastercache"])
def test_diffusers_caches_for_transformers_are_reported_on_a_unet_and_removed(pipe, spec):
    before = _full(pipe)
    with pytest.raises(PeerUnavailable, match="does not run on UNet2DConditionModel"):
        with method(_ONE(pipe), spec) as run:
            run(_ONE(pipe))
    np.testing.assert_array_equal(_full(pipe), before)


@pytest.fixture(scope="module")
def pixart():
    from attnreuse.pipelines.tiny import build_pipeline

    return build_pipeline("tiny-pixart")


@pytest.mark.parametrize("spec", ["fbc:0.5", "fastercache", "pab:2", "taylorseer:2", "magcache:0.5",
                                  pytest.param("plan:0.9", marks=pytest.mark.slow)])
def test_dit_peers_run_on_a_pixart_pipeline_and_leave_it_as_it_was(pixart, spec, tmp_path, monkeypatch):
    """The DiT-native peers attach to `pipe.transformer` (MagCache with ratios from its own calibration run on the
    calibration prompts, never the evaluated ones), change the images, and are removed."""
    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path))
    setup = GenerationSetup(pixart, ["a red circle"], [0], 6, 4.5)
    with method(setup, "full") as run:
        before = run(setup)
    with method(setup, spec, calibration=["a blue square"]) as run:
        images = run(setup)
        info = run.info
    assert images.shape == before.shape and not np.array_equal(images, before)
    if spec.startswith("magcache"):
        assert len(info["mag_ratios"]) == 6 and info["mag_ratios"][0] == 1.0
    with method(setup, "full") as run:
        np.testing.assert_array_equal(run(setup), before)


@pytest.mark.slow
def test_phast_searches_on_the_calibration_prompts_once_then_reads_its_cached_schedule(sd_pipe, tmp_path,
                                                                                      monkeypatch):
    import attnreuse.search.store as store

    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path))
    searches, search = [], store.search_schedule
    monkeypatch.setattr(store, "search_schedule",
                        lambda setup, *a, **k: searches.append(setup.prompts) or search(setup, *a, **k))
    calibration = ["a blue square", "a green circle"]

    def phast(spec="phast:2", calibration=calibration):
        with method(_ONE(sd_pipe, 6, 7.5), spec, calibration) as run:
            return run(_ONE(sd_pipe, 6, 7.5)), run.info

    first, info = phast()
    (path,) = (tmp_path / "schedules").glob("*.json")
    assert searches == [calibration] and info["schedule_file"] == str(path)
    schedule = Schedule.from_json(path)  # the format of `attnreuse search --out`, usable as a schedule file
    assert info["schedule"] == str(schedule) and schedule.num_reuse == 2
    assert schedule.meta["strategy"] == "phast" and schedule.meta["prompts"] == calibration
    with method(_ONE(sd_pipe, 6, 7.5), info["schedule"]) as run:  # phast:2 ran the schedule it found
        np.testing.assert_array_equal(run(_ONE(sd_pipe, 6, 7.5)), first)
    written = path.stat().st_mtime_ns
    again, _ = phast()
    assert searches == [calibration] and path.stat().st_mtime_ns == written  # read back, not searched again
    np.testing.assert_array_equal(again, first)
    phast("phast:2", calibration[:1])  # another calibration set is another search and another file
    assert len(searches) == 2 and len(list((tmp_path / "schedules").glob("*.json"))) == 2
    with pytest.raises(ValueError, match="calibration prompts"):
        phast("phast:2", None)
