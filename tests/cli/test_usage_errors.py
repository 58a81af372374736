"""Every user error on the command line exits 2 with one line naming the problem, before any model loads."""

import pytest

import attnreuse.bench.run
import attnreuse.cli.bench
import attnreuse.cli.checks
import attnreuse.cli.pipeline
import attnreuse.default_model.evaluate
import attnreuse.default_model.train
from attnreuse.cli import main

CASES = [
    # generate
    (["generate", ""], "the prompt is empty"),
    (["generate", "a red circle", "--steps", "0"], "--steps must be at least 1"),
    (["generate", "a red circle", "--size", "0"], "--size must be a positive multiple of 8"),
    (["generate", "a red circle", "--size", "30"], "--size must be a positive multiple of 8"),
    (["generate", "a red circle", "--device", "cuda"], "no CUDA device"),
    (["generate", "a red circle", "--device", "floppy"], "is not a device"),
    (["generate", "a red circle", "--schedule", "0110"], "first step of a schedule must compute"),
    (["generate", "a red circle", "--schedule", "110"], "expected a schedule of length 20"),
    (["generate", "a red circle", "--schedule", "{tmp}/missing.json"], "no such file"),
    (["generate", "a red circle", "--schedule", "hurry:20"], "HURRY needs 0 <= reuse_steps < num_steps"),
    (["generate", "a red circle", "-o", "{tmp}/out.txt"], "must end in one of .png"),
    (["generate", "a red circle", "-o", "{tmp}/afile/out.png"], "a file is in the way"),
    (["generate", "a red circle", "--seed", "-1"], "--seed must be a whole number"),
    (["generate", "a red circle", "--guidance", "nan"], "--guidance must be a finite number"),
    (["generate", "a red circle", "--model", "/no/such/model"], "no such folder"),
    (["generate", "a red circle", "--model", "{tmp}/empty"], "no model_index.json"),
    (["generate", "a red circle", "--sampler", "heun", "--steps", "4", "--schedule", "11000"],
     "expected a schedule of length 7 (one per model call) or 4"),
    # speed
    (["speed", "--model", "tiny-sd", "--repeats", "0"], "--repeats must be at least 1"),
    (["speed", "--model", "tiny-sd", "--json", "{tmp}/speed.txt"], "must end in one of .json"),
    # search
    (["search", "--steps", "20", "--reuse", "20"], "--reuse must be from 0 to --steps - 1"),
    (["search", "--steps", "20", "--reuse", "5", "--exhaustive"], "--exhaustive is for --steps <= 16"),
    (["search", "--calibration", "0"], "--calibration must be at least 1"),
    (["search", "--epsilon", "-1"], "--epsilon must be at least 0"),
    (["search", "--out", "{tmp}/schedule.txt"], "must end in one of .json"),
    (["search", "--state", "{tmp}/broken.json"], "is not valid JSON"),
    (["search", "--prompts", "{tmp}/empty.txt"], "0 prompt(s), but 8 are needed"),
    (["search", "--prompts", "{tmp}/no-such-prompts.txt"], "no such file"),
    (["search", "--model", "tiny-sd"], "needs --prompts FILE"),
    # compare
    (["compare", "--schedules", "random:0"], "random:K needs a whole number K >= 1"),
    (["compare", "--schedules", "1101"], "expected a schedule of length 20"),
    (["compare", "--schedules", ","], "--schedules is empty"),
    (["compare", "--count", "0"], "--count must be at least 1"),
    # eval
    (["eval", "--methods", "bogus"], "method 'bogus' is neither a method"),
    (["eval", "--methods", "steps:0"], "steps's argument must be at least 1"),
    (["eval", "--methods", "tome:2"], "tome's argument must be above 0.0 and below 1.0"),
    (["eval", "--methods", "hurry:x"], "'x' is not a whole number"),
    (["eval", "--methods", "full", "--repeats", "0"], "--repeats must be at least 1"),
    (["eval", "--methods", "phast:4", "--calibration", "0"], "--calibration must be at least 1"),
    (["eval", "--count", "0"], "--count must be at least 1"),
    (["eval", "--out", "{tmp}/afile"], "a file is in the way"),
    (["generate", "a red circle", "--budget", "1.5"], "--budget must be a fraction"),
    (["generate", "a red circle", "--model", "tiny-sd", "--budget", "0"], "--budget must be a fraction"),
    # plan
    (["plan", "--budget", "0"], "--budget must be"),
    (["plan", "--budget", "1.5"], "at most 1, got 1.5"),
    (["plan", "--target-psnr", "nan"], "--target-psnr must be a finite number"),
    (["plan", "--target-psnr", "40", "--effort", "full"], "--target-psnr is planned by the quick planner"),
    (["plan", "--budget", "0.5", "--state", "{tmp}/s.json"], "--state steers the full search's climb"),
    (["plan", "--budget", "0.5", "--sweeps", "2"], "--sweeps steers the full search's climb"),
    (["plan", "--budget", "0.5", "--effort", "full", "--sweeps", "-1"], "--sweeps must be at least 0"),
    (["plan", "--budget", "0.5", "--effort", "full", "--profile", "{tmp}/quick.json", "--out", "{tmp}/o/p.json"],
     "a quick plan times only a reused call"),
    # analyze
    (["analyze", "sensitivity", "--steps", "3"], "needs at least 4 steps"),
    # bench
    (["bench", "--arch", "sd3"], "--arch 'sd3': choose from"),
    (["bench", "--batch", "3"], "batches must be even"),
    (["bench", "--batch", "two"], "a comma list of whole numbers"),
    (["bench", "--modes", "flash"], "Unknown bench mode(s) ['flash']"),
    (["bench", "--size", "100"], "--size must be a positive multiple of 8"),
    (["bench", "--max-cache", "-1"], "--max-cache must be at least 0"),
    (["bench", "--dtype", "int8"], "--dtype 'int8'"),
    (["bench", "--out", "{tmp}/badbench"], "is not valid JSON"),
    # train-default, evaluate-default
    (["train-default", "--vae-steps", "0"], "--vae-steps must be at least 1"),
    (["train-default", "--unet-lr", "0"], "--unet-lr must be above 0"),
    (["train-default", "--unet-minutes", "-5"], "--unet-minutes must be above 0"),
    (["evaluate-default", "--model", "{tmp}/empty"], "no model_index.json"),
    (["evaluate-default", "--sweep", "2,x"], "a comma list of guidance scales"),
    (["evaluate-default", "--count", "0"], "--count must be at least 1"),
]


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module, name in [(attnreuse.cli.pipeline, "load_default_pipeline"), (attnreuse.cli.pipeline, "build_pipeline"),
                         (attnreuse.cli.pipeline, "load_pipeline"), (attnreuse.bench.run, "build_unet"),
                         (attnreuse.default_model.train, "train_default"),
                         (attnreuse.default_model.evaluate, "evaluate_default")]:
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_a_user_error_exits_2_with_one_line_before_any_work(argv, message, tmp_path, capsys, nothing_loads):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "broken.json").write_text('{"utilities": ')
    (tmp_path / "quick.json").write_text('{"meta": {"strategy": "quick planner", "latency_model": {}}}')
    (tmp_path / "badbench").mkdir()
    (tmp_path / "badbench" / "bench.json").write_text("[{")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] not in ("speed", "train-default", "evaluate-default", "generate", "bench") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out" / ("schedule.json" if argv[0] == "search" else ""))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnreuse: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()  # no output folder made for a run that did not start


def test_the_dit_model_before_it_is_trained_is_a_usage_error(tmp_path, monkeypatch, capsys, nothing_loads):
    monkeypatch.setitem(attnreuse.cli.checks.DEFAULT_MODELS, "dit", tmp_path / "weights_dit")
    for argv in (["eval", "--model", "dit", "--out", str(tmp_path / "out")], ["evaluate-default", "--model", "dit"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--model dit: the DiT default model is not trained yet" in err[0], err
