"""Files written together stay together under faults (an eval report, generate's pair of images), a full disk is
one line, results respect the umask, and loading a pipeline prints nothing of transformers' torchvision notices."""

import os
import subprocess
import sys

import pytest

from attnreuse.cli import main
from attnreuse.files import atomic_write, write_json, written_together


def _failing_rename(monkeypatch, nth: int, errno_: int = 28):
    """os.replace fails (disk full) on the `nth` temporary file renamed into place; every other rename works."""
    real, seen = os.replace, []

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            seen.append(dst)
            if len(seen) == nth:
                raise OSError(errno_, os.strerror(errno_), str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_set_is_all_new_or_all_old_after_a_fault_on_any_rename(tmp_path, monkeypatch, nth):
    for name in ("a.json", "b.md"):
        (tmp_path / name).write_text(f"old {name}")
    before = _contents(tmp_path)
    _failing_rename(monkeypatch, nth)
    with pytest.raises(OSError, match="No space left"):
        with written_together():
            write_json(tmp_path / "a.json", {"new": 1})
            atomic_write(tmp_path / "b.md", lambda tmp: tmp.write_text("new"))
            atomic_write(tmp_path / "c.png", lambda tmp: tmp.write_bytes(b"new"))  # not in the old set
    assert _contents(tmp_path) == before  # byte for byte, no temporary or kept file left


def test_a_full_disk_names_the_file_asked_for_and_leaves_no_temporary_file(tmp_path, capsys):
    (tmp_path / "r.json").write_text("old")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as raised:
        atomic_write(tmp_path / "r.json", full)
    assert raised.value.filename == str(tmp_path / "r.json") and raised.value.errno == 28
    assert _contents(tmp_path) == {"r.json": b"old"}


def test_a_fault_while_writing_a_set_leaves_the_old_one(tmp_path):
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(RuntimeError):
        with written_together():
            write_json(tmp_path / "a.json", {"new": 1})
            raise RuntimeError("the plot failed")
    assert _contents(tmp_path) == {"a.json": b"old"}


def test_a_set_lands_whole(tmp_path):
    with written_together():
        write_json(tmp_path / "a.json", [1])
        write_json(tmp_path / "a.json", [2])  # written twice: the last one lands
        assert not (tmp_path / "a.json").exists()  # nothing renamed before the set is whole
    assert _contents(tmp_path) == {"a.json": b"[\n 2\n]\n"}


def test_results_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_a_rerun_of_eval_or_generate_that_fails_keeps_the_earlier_set(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    command = ["eval", "--steps", "2", "--count", "1", "--repeats", "1", "--methods", "full,hurry:1", "--device",
               "cpu", "--out", str(out)]
    assert main(command) == 0
    before = _contents(out)
    _failing_rename(monkeypatch, 2)
    assert main(command[:-1] + [str(out)]) == 1  # the disk is full on the report's second file
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attnreuse")]
    assert len(errors) == 1 and errors[0].startswith("attnreuse: error: no room left to write")
    assert str(out) in errors[0]
    assert _contents(out) == before
    monkeypatch.undo()
    images = tmp_path / "g"
    generate = ["generate", "a red circle", "--steps", "2", "--repeats", "1", "--device", "cpu", "-o",
                str(images / "o.png")]
    assert main(generate) == 0
    pair = _contents(images)
    _failing_rename(monkeypatch, 2)
    assert main(generate[:1] + ["a blue square"] + generate[2:]) == 1
    assert _contents(images) == pair  # never o.png of the new prompt beside o.full.png of the old one


def test_loading_a_pipeline_prints_no_torchvision_notice():
    """transformers notes that a pipeline's image processor falls back to PIL without torchvision; the notice is
    left out where a pipeline loads (a subprocess: the notice is printed once per process)."""
    script = ("from attnreuse.default_model import load_default_pipeline; load_default_pipeline(); "
              "from attnreuse.pipelines.tiny import build_pipeline; build_pipeline('tiny-sd')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stderr
