"""The method registry is the one table: the CLI's list of methods, the presets per model kind, the report's families
and the plot's styles are read from it, so a peer is plotted and tabled as a peer (MagCache was once drawn on
attnreuse's own curve)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attnreuse.cli import build_parser, main
from attnreuse.eval.methods import (
    KINDS,
    PEERS,
    PRESETS,
    REGISTRY,
    SCHEDULES,
    PeerUnavailable,
    check_spec,
    expand,
    family,
    family_role,
    lookup,
    records,
)
from attnreuse.eval.plots import STYLES, curves
from attnreuse.eval.report import replot
from attnreuse.eval.runner import summarize

DIT_REPORT = Path(__file__).parents[2] / "docs" / "results" / "dit" / "eval_ddim20.json"
OWN_FAMILIES = {spec.family for spec in records() if spec.role == "attnreuse"}


def _example(spec) -> str:
    """A spec that runs the record: its first preset entry, or a schedule of 20 steps for SCHEDULES."""
    if spec is SCHEDULES:
        return "10" * 10
    return next(s for preset in spec.presets for s in spec.specs(preset))


def _rows(specs) -> list[dict]:
    """The report's rows (`runner.summarize`) of `specs` run against `full`, with made-up images and times."""
    rng = np.random.default_rng(0)
    full = rng.random((1, 16, 16, 3), dtype=np.float32)
    runs = {"full": {"images": full, "times": [1.0], "memory": 0}}
    for i, spec in enumerate(specs):
        runs[spec] = {"images": np.clip(full + 0.01 * (i + 1), 0, 1), "times": [0.5 + 0.01 * i], "memory": 0}
    return summarize(runs, {}, ["a prompt"])["rows"]


@pytest.mark.parametrize("name", [spec.name for spec in records()])
def test_every_method_is_tabled_and_plotted_in_its_role(name):
    """For every record: the report's row carries its family, the family's role is the record's, and the Pareto
    plot draws it in that role's style; a peer's family is none of attnreuse's and is drawn as a peer."""
    spec = REGISTRY.get(name, SCHEDULES)
    example = _example(spec)
    assert lookup(example) is spec
    (row,) = [r for r in _rows([example]) if r["method"] == example]
    assert row["family"] == spec.family == family(example) and family_role(spec.family) == spec.role
    drawn = {name: style for name, _, style in curves([row])}
    if spec.role == "reference":
        assert not drawn  # full is the reference every other is measured against, not a curve
        return
    assert {k: drawn[spec.family][k] for k in STYLES[spec.role]} == STYLES[spec.role]
    if spec.role == "peer":
        assert spec.family not in OWN_FAMILIES and spec.name in PEERS
        assert drawn[spec.family]["marker"] != STYLES["attnreuse"]["marker"]
        assert "attnreuse" not in drawn[spec.family]["label"]


def test_magcache_is_a_peer():
    assert "magcache" in PEERS and REGISTRY["magcache"].role == "peer"
    for spec in ("magcache:0.06", "magcache:0.2", "magcache"):
        assert family(spec) == "magcache" and family_role(family(spec)) == "peer"
    rows = _rows(["magcache:0.06", "magcache:0.2", "hurry:10", "plan:0.5"])
    drawn = {name: (members, style) for name, members, style in curves(rows, lines=("plan",))}
    members, style = drawn["magcache"]
    assert [r["method"] for r in members] == ["magcache:0.06", "magcache:0.2"] and style["marker"] == "s"
    assert [r["method"] for r in drawn["reuse"][0]] == ["hurry:10"]  # attnreuse's own curve holds no peer


def test_the_stored_dit_report_draws_magcache_as_a_peer(tmp_path):
    """`replot` reads the families afresh from the registry: a report written with MagCache in attnreuse's family
    is redrawn (and, with refresh, restored) with MagCache as a peer."""
    report = json.loads(DIT_REPORT.read_text())
    for row in report["rows"]:
        if row["method"].startswith("magcache"):
            row["family"] = "reuse"  # as the report was written
    stored = tmp_path / "eval_ddim20.json"
    stored.write_text(json.dumps(report))
    png = replot(stored, refresh=True)
    assert png == tmp_path / "pareto_ddim20.png" and png.stat().st_size > 0
    rows = json.loads(stored.read_text())["rows"]
    assert {r["family"] for r in rows if r["method"].startswith("magcache")} == {"magcache"}
    assert all(r["family"] == family(r["method"]) for r in rows)
    shutil.copy(stored, tmp_path / "eval.json")
    assert replot(tmp_path / "eval.json") == tmp_path / "pareto.png"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_entry_is_a_registered_method_that_applies_to_the_kind(name, kind):
    entries = PRESETS[name][kind]
    assert entries and entries[0] == "full" and len(set(entries)) == len(entries)
    assert list(entries) == expand(name, kind)
    for entry in entries:
        spec = lookup(entry)
        assert spec is not SCHEDULES and spec.name in REGISTRY and kind in spec.applies_to
        assert entry in spec.specs(name)
        check_spec(entry, 20)
    # exactly the registry's entries: every record that applies to the kind gives the preset its arguments
    assert set(entries) == {s for spec in REGISTRY.values() if kind in spec.applies_to for s in spec.specs(name)}


def test_the_frontier_runs_every_peer_that_applies_to_the_kind():
    for kind in KINDS:
        peers = {spec.name for spec in REGISTRY.values() if spec.role == "peer" and kind in spec.applies_to}
        assert {lookup(entry).name for entry in PRESETS["frontier"][kind]} >= peers | {"plan", "steps", "full"}
    assert "magcache:0.06" in PRESETS["frontier"]["transformer"] and "deepcache:3" in PRESETS["frontier"]["unet"]
    assert not any(lookup(e).name in ("fbc", "fastercache", "magcache") for e in PRESETS["frontier"]["unet"])
    assert not any(lookup(e).name in ("deepcache", "tgate", "tome") for e in PRESETS["frontier"]["transformer"])


def _methods_help() -> str:
    evaluate = next(a for a in build_parser()._subparsers._group_actions if a.choices).choices["eval"]
    return next(a for a in evaluate._actions if a.dest == "methods").help


def test_the_cli_lists_exactly_the_registry():
    text = _methods_help()
    listed = text.split(" and methods: ", 1)[1]
    assert listed == ", ".join(spec.usage for spec in records())
    assert all(f"{name}" in text.split(" and methods: ")[0] for name in PRESETS)
    for spec in records():
        check_spec(_example(spec), 20)  # every record's usage is accepted as typed
    with pytest.raises(ValueError, match=r"neither a method \(" + ", ".join(REGISTRY) + r"\)"):
        check_spec("bogus", 20)
    assert expand("quick, frontier,quick,deepcache:7") == [*expand("quick"), *(e for e in expand("frontier")
                                                                                if e not in expand("quick")),
                                                           "deepcache:7"]


def test_eval_runs_a_preset_for_the_model_kind_it_loads(tmp_path, monkeypatch):
    """`--methods frontier` on a transformer pipeline runs the transformer's frontier (MagCache, no DeepCache)."""
    import attnreuse.cli.evaluate as evaluate

    class Ran(Exception):
        pass

    def run_methods(setup, methods, *args):
        raise Ran(methods)

    monkeypatch.setattr(evaluate, "run_methods", run_methods)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    with pytest.raises(Ran) as ran:
        main(["eval", "--model", "tiny-pixart", "--steps", "20", "--count", "1", "--calibration", "1", "--methods",
              "frontier", "--prompts", str(tmp_path / "prompts.txt"), "--device", "cpu", "--out", str(tmp_path / "o")])
    assert ran.value.args[0] == list(PRESETS["frontier"]["transformer"])


def test_a_method_on_a_pipeline_of_another_kind_says_so():
    class Transformer:
        transformer = torch.nn.Linear(1, 1)

    class Unet:
        unet = torch.nn.Linear(1, 1)

    with pytest.raises(PeerUnavailable, match="deepcache does not run on Linear: it applies to UNet pipelines"):
        REGISTRY["deepcache"].check_runs_on(Transformer())
    with pytest.raises(PeerUnavailable, match="magcache does not run on Linear: it applies to transformer"):
        REGISTRY["magcache"].check_runs_on(Unet())
    REGISTRY["pab"].check_runs_on(Unet())
    REGISTRY["pab"].check_runs_on(Transformer())
