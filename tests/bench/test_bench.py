"""`attnreuse bench`: every mode's per-call and end-to-end ratios, maps too large for memory, later generations."""

import json

import numpy as np
import pytest
import torch

from attnreuse import attention_layers, bench
from attnreuse.bench import calls
from attnreuse.cache import MapMemory
from attnreuse.cli import main


@pytest.mark.slow
def test_bench_runs_every_mode_and_writes_ratios(tmp_path, capsys):
    assert main(["bench", "--arch", "tiny-sd", "--batch", "2", "--repeats", "1", "--e2e-repeats", "1",
                 "--schedule", "101", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["per_call"]) == {"sdpa", "map", "map-torch", "map-fp8", "qk", "output", "auto"}
    assert all(row["store_ms"] > 0 and row["reuse_x"] > 0 and row["plain_ms"] > 0
               for name, row in result["per_call"].items() if name != "sdpa")
    assert len(result["per_call"]["sdpa"]["runs_ms"]) == 1  # one timed round, every call kept
    assert all(np.shape(row["runs_ms"]) == (1, 7) for row in result["per_call"].values() if "store_ms" in row)
    stock, ops = result["per_call"]["sdpa"]["ops"], {n: r["ops"] for n, r in result["per_call"].items() if n != "sdpa"}
    assert all(o["plain"] == stock + 1 for o in ops.values())  # the handle reads the bare model's timestep, no more
    assert all(o["reuse"] < stock for o in ops.values())  # a reuse call launches less in every mode
    assert ops["output"]["reuse"] < ops["qk"]["reuse"] < ops["map"]["reuse"] == ops["map-torch"]["reuse"]
    assert 0 < result["attention_share"]["cross"] < 1 and 0 < result["attention_share"]["self"] < 1
    assert result["attention_only"]["shape"][2] == 16 * 16  # tiny-sd's largest self-attention: 16 x 16 latents
    e2e = result["end_to_end"]
    assert all(len(row["runs_ms"]) == 1 and row["speedup_local"] > 0 for name, row in e2e.items()
               if name not in ("none", "none_again"))
    assert e2e["none"]["speedup"] == 1.0 and e2e["map"]["rms_latent_change"] == pytest.approx(
        e2e["qk"]["rms_latent_change"], rel=1e-3)
    assert "| map |" in (tmp_path / "bench.md").read_text()
    assert main(["bench", "--arch", "tiny-sd", "--modes", "flash", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "Unknown bench mode(s) ['flash']" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_skips_maps_beyond_free_cpu_memory_and_runs_them_under_a_budget(tmp_path, monkeypatch):
    """A CPU process whose maps exceed its memory is killed, so the bench names such a mode instead of running it;
    with --max-cache the same mode runs within that budget."""
    monkeypatch.setattr(calls, "_available_bytes", lambda: 4 * 2**20)  # tiny-sd's maps: 6.1 MiB in fp32, 3.1 in bf16
    args = ["bench", "--arch", "tiny-sd", "--modes", "map,map-bf16,qk", "--e2e-modes", "map", "--repeats", "1",
            "--e2e-repeats", "1", "--schedule", "101", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    (result,) = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert result["setup"]["map_gib"] * 2**30 == 2 * 4 * (3 * 256**2 + 64**2) * 4  # batch, heads, 16^2 and 8^2 tokens
    skipped = {"skipped": "maps need 0.00598 GiB, 0.00391 GiB free: set a budget (--max-cache) or 16-bit maps"}
    assert result["per_call"]["map"] == skipped and result["end_to_end"]["map"] == skipped
    assert all(result["per_call"][m]["store_ms"] > 0 for m in ("map-bf16", "qk"))
    assert "set a budget" in (tmp_path / "a" / "bench.md").read_text()
    assert main([*args, "--max-cache", "0.002", "--out", str(tmp_path / "b")]) == 0
    (result,) = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["setup"]["max_cache_bytes"] == int(0.002 * 2**30)
    for rows in (result["per_call"], result["end_to_end"]):
        assert 0 < rows["map"]["cache_mib"] <= 0.002 * 1024
    assert "cache budget 0.002 GiB" in (tmp_path / "b" / "bench.md").read_text()


def test_bench_end_to_end_times_later_generations_of_a_handle(monkeypatch):
    """The timed loops are what a user sees after applying reuse once: every store finds the layer's kept map
    memory, which only the variant's warm-up generation had to allocate."""
    unet, inputs = bench.build_unet("tiny-sd", "cpu", torch.float32, 2)
    layers = sum(kind == "self" for kind in attention_layers(unet).values())
    found, original = [], MapMemory.get
    monkeypatch.setattr(MapMemory, "get",
                        lambda self, name, *a: found.append(name in self.buffers) or original(self, name, *a))
    bench.end_to_end(unet, inputs, ["map"], "1010", 2, torch.device("cpu"))
    assert len(found) == 3 * 2 * layers  # warm-up and two timed generations, two stores per layer each
    assert not any(found[:layers]) and all(found[layers:])


def test_a_write_fault_never_loses_earlier_bench_results(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    out = tmp_path / "bench"
    out.mkdir()
    earlier = [{"setup": {"arch": "earlier run"}}]
    (out / "bench.json").write_text(json.dumps(earlier))
    real = Path.write_text

    def disk_full(self, data, *args, **kwargs):  # half the text lands, then the disk is full
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert main(["bench", "--arch", "tiny-sd", "--modes", "map", "--e2e-modes", "none", "--repeats", "1",
                 "--device", "cpu", "--out", str(out)]) == 1  # one line, no traceback
    monkeypatch.undo()
    assert json.loads((out / "bench.json").read_text()) == earlier
    assert sorted(p.name for p in out.iterdir()) == ["bench.json"]  # no half-written temporary file either
    assert capsys.readouterr().err.splitlines()[-1].startswith("attnreuse: error: no room left to write")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-flux", "pixart-sigma"])
def test_bench_times_transformers_with_block_reuse(arch, tmp_path):
    """A transformer (tiny, or a published config cut to one block at 128 px and 16 text tokens): every mode and
    block reuse per call, and a flow-matching loop end to end; joint attention counts both streams' tokens."""
    assert main(["bench", "--arch", arch, "--batch", "1", "--modes", "map,qk,output,blocks", "--repeats", "1",
                 "--e2e-repeats", "1", "--schedule", "1010", "--layers", "1", "--size", "128", "--text-tokens",
                 "16", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "bench.json").read_text())
    assert result["setup"]["loop"] == "flow-euler" and result["setup"]["layers"] == 1
    per_call = result["per_call"]
    assert set(per_call) == {"sdpa", "map", "qk", "output", "blocks"}
    assert per_call["blocks"]["ops"]["reuse"] < per_call["output"]["ops"]["reuse"] < per_call["sdpa"]["ops"]
    assert set(result["end_to_end"]) == {"none", "map", "qk", "output", "blocks", "none_again"}
    image_tokens = (128 // 8 // 2) ** 2  # latents of 16 x 16 in patches of 2
    joint = arch == "tiny-flux"
    assert result["attention_only"]["shape"][2] >= image_tokens + (1 if joint else 0)
    assert "flow-matching Euler loop" in (tmp_path / "bench.md").read_text()
