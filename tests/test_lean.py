"""The lean paths (issue 6): lookahead storage, modes, the memory budget, fp8 maps, torch.compile, the store
kernel (Triton, in interpreter mode where no GPU is present) and `attnreuse bench`."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from attnreuse import Schedule, apply_attention_reuse, processors
from attnreuse.metrics import psnr

from conftest import STEPS, CallCounter, attention_modules, run


def test_lookahead_stores_exactly_the_maps_a_later_call_reuses(sd_pipe, monkeypatch):
    made = []
    for maker in ("_attention_map", "_map_store_cpu"):  # the one-shot map and the CPU blockwise store
        original = getattr(processors, maker)
        monkeypatch.setattr(processors, maker, lambda *a, _f=original, **k: made.append(1) or _f(*a, **k))
    layers = attention_modules(sd_pipe, "self")
    q = CallCounter([(n, m.to_q) for n, m in layers])
    schedule = Schedule("1101001")  # stores at calls 1 and 3 only: calls 0, 5, 6 compute without a map
    with apply_attention_reuse(sd_pipe, schedule, attention="self") as handle:
        run(sd_pipe, steps=7)
        stats = handle.stats()["layers"]
    assert len(made) == 2 * len(layers)  # a map is materialised only where a later call reads it
    assert q.values() == {len(schedule) - schedule.num_reuse}
    assert {(s["stored"], s["computed"], s["reused"]) for s in stats.values()} == {(2, 4, 3)}


def test_modes_keep_the_same_map_or_say_they_do_not(sd_pipe):
    """qk recomputes the same A by flash attention and auto picks map or qk per layer: both agree with map;
    output mode (PAB-style, labelled as not the paper's method) changes the image more."""
    schedule = Schedule.hurry(STEPS, 3)
    images, peaks = {}, {}
    for mode in ("map", "qk", "auto", "output"):
        with apply_attention_reuse(sd_pipe, schedule, mode=mode) as handle:
            images[mode] = run(sd_pipe)
            peaks[mode] = handle.stats()["peak_cache_bytes"]
            assert {s["reused"] for s in handle.stats()["layers"].values()} == {3}
    for mode in ("qk", "auto"):
        np.testing.assert_allclose(images[mode], images["map"], atol=2e-5)
    assert peaks["output"] < peaks["qk"] < peaks["map"]
    assert not np.allclose(images["output"], images["map"], atol=1e-4)


def test_memory_budget_is_never_exceeded_and_zero_means_no_reuse(sd_pipe):
    schedule = Schedule.hurry(STEPS, 3)
    full = run(sd_pipe)
    with apply_attention_reuse(sd_pipe, schedule) as handle:
        run(sd_pipe)
        unlimited = handle.stats()["peak_cache_bytes"]
    with apply_attention_reuse(sd_pipe, schedule, max_cache_bytes=0) as handle:
        np.testing.assert_array_equal(run(sd_pipe), full)  # nothing fits: every layer computes, exactly
        assert {s["reused"] for s in handle.stats()["layers"].values()} == {0}
    budget = unlimited // 2
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(handle.stats())
        return kwargs

    with apply_attention_reuse(sd_pipe, schedule, max_cache_bytes=budget) as handle:
        first = run(sd_pipe, callback_on_step_end=callback)
        second = run(sd_pipe)
        peak = handle.stats()["peak_cache_bytes"]
    np.testing.assert_array_equal(first, second)  # the choice depends on shapes only
    assert 0 < peak <= budget and all(s["cache_bytes"] <= budget for s in seen)
    kinds = {s["cache"] for s in seen[3]["layers"].values()}
    assert "map" in kinds and kinds - {"map", "cross"}  # some layers fell back to Q and K, or to nothing


def test_fp8_maps_are_a_quarter_of_fp32_and_close(sd_pipe):
    schedule = Schedule.hurry(STEPS, 3)
    peaks, images = {}, {}
    for dtype in (None, torch.float8_e4m3fn):
        with apply_attention_reuse(sd_pipe, schedule, attention="self", cache_dtype=dtype) as handle:
            images[dtype] = run(sd_pipe)
            peaks[dtype] = handle.stats()["peak_cache_bytes"]
    assert peaks[torch.float8_e4m3fn] * 4 == peaks[None]
    assert psnr(images[torch.float8_e4m3fn], images[None]) > 35


MAP_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def _packed(attn_map, dtype):
    """A map as the cache keeps it: rounded to `dtype`, fp8 scaled by the format's largest value."""
    scale = processors._FP8_SCALE.get(dtype, 1.0)
    return (attn_map * scale).to(dtype)


def _assert_rounded(kept, expected):
    """Equal up to one step of the map's format: fp32 rounding before the cast can move a value across a
    rounding boundary."""
    step = torch.finfo(kept.dtype) if kept.dtype != torch.float32 else None
    torch.testing.assert_close(kept.float(), expected.float(), rtol=step.eps if step else 1e-5,
                               atol=step.tiny if step else 1e-6)


@pytest.mark.parametrize("dtype", MAP_DTYPES, ids=str)
def test_cpu_blockwise_store_is_the_one_shot_map_and_output(monkeypatch, dtype):
    """The CPU store writes A block by block into the map, over the cores in parts; with blocks that do not divide
    the queries it still gives the one-shot softmax(Q K^T * scale), rounded to the map's dtype. Its output is the
    A V of the unrounded A for fp32 and fp8 maps, and for 16-bit maps what a reuse of the kept map computes."""
    torch.manual_seed(0)
    q = torch.randn(2, 37, 3, 8).transpose(1, 2)  # (batch, heads, queries, dim), strided as the processor has it
    k, v = torch.randn(2, 3, 41, 8), torch.randn(2, 3, 41, 8)
    monkeypatch.setattr(processors, "_BLOCK", 5 * 41)  # 5 query rows per block: 37 = 7 x 5 + 2
    attn_map = torch.full((6, 37, 41), float("nan")).to(dtype)
    out = processors._map_store_cpu(q, k, v, 0.3, attn_map, processors._FP8_SCALE.get(dtype))
    reference = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1)
    expected = _packed(reference.reshape(6, 37, 41), dtype)
    _assert_rounded(attn_map, expected)
    if dtype in (torch.bfloat16, torch.float16):
        reuse = processors._times_map(attn_map, v.reshape(6, 41, 8), None)
        torch.testing.assert_close(out, reuse, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)
        reference = (attn_map.double() @ v.reshape(6, 41, 8).to(dtype).double()).view(2, 3, 37, 8)  # rounded once
        tolerance = dict(rtol=torch.finfo(dtype).eps, atol=1e-3)
    else:
        tolerance = dict(rtol=1e-5, atol=1e-6)
        reference = reference @ v
    torch.testing.assert_close(out.view(2, 3, 37, 8), reference.float(), **tolerance)


@pytest.mark.parametrize("dtype", MAP_DTYPES[1:], ids=str)
def test_reduced_precision_map_reuse_is_the_rounded_map_times_v(dtype):
    """With `cache_dtype`, the cache holds A rounded to that dtype, and a reuse call applies that A to the fresh V:
    a 16-bit map multiplies V rounded to its dtype (one read of A, no copy), an fp8 map is dequantised first. A
    store call with a 16-bit map gives what a reuse of its map computes at the same call; with an fp8 map, the
    plain call's output."""
    from test_processor import OneLayer

    torch.manual_seed(0)
    model = OneLayer(query_dim=32, heads=4, dim_head=8).eval()
    attn = model.attn
    x0, x1 = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    with torch.no_grad():
        plain = model(x0)
        with apply_attention_reuse(model, Schedule("10"), cache_dtype=dtype) as handle:
            stored = model(x0)
            kept = handle.state.slots["attn"][1]
            reused = model(x1)
        heads = lambda t: t.view(2, 64, 4, 8).transpose(1, 2).reshape(8, 64, 8)  # noqa: E731
        exact = torch.softmax(heads(attn.to_q(x0)).double() @ heads(attn.to_k(x0)).double().transpose(1, 2)
                              * 8 ** -0.5, -1)
        scale = processors._FP8_SCALE.get(dtype)

        def applied(x):  # the kept map applied to the V of input x, then the output projection
            value = heads(attn.to_v(x)).double()
            if scale is None:  # 16-bit: both factors rounded, the product rounded to the map's dtype
                product = (exact.to(dtype).double() @ value.to(dtype).double()).to(dtype)
            else:
                product = _packed(exact, dtype).double() @ value / scale
            return attn.to_out[0](product.float().view(2, 4, 64, 8).transpose(1, 2).reshape(2, 64, 32))

        fresh = model(x1)
        torch.testing.assert_close(stored, plain if scale else applied(x0), rtol=1e-5 if scale else 0,
                                   atol=1e-6 if scale else 1e-4)
        assert kept.dtype == dtype and kept.shape == (8, 64, 64)
        _assert_rounded(kept, _packed(exact.float(), dtype))
        torch.testing.assert_close(reused, applied(x1), rtol=0, atol=1e-4)  # the rounding is the only difference
    assert (reused - fresh).abs().max() > 1e-2  # and the reuse did not recompute the map
    if scale is None:
        assert (stored - plain).abs().max() > 0  # the 16-bit store's output is the rounded product
    with apply_attention_reuse(model, Schedule("10"), cache_dtype=dtype):
        differentiable = model(x0)  # autograd on: the one-shot store, as under torch.compile, gives the same
    torch.testing.assert_close(differentiable.detach(), stored, rtol=0, atol=1e-4)


def test_cpu_store_parts_cover_each_item_once_on_the_cores_and_restore_torch_threads(monkeypatch):
    """`_on_cores` gives every item to exactly one part, runs the parts on one pool thread per torch thread with
    torch single-threaded inside, and restores torch's thread count, also when a part fails."""
    import threading

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # as on a 3-core machine, whatever this one has
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    seen = []

    def work(items):
        seen.append((threading.current_thread().name, list(items)))

    processors._on_cores(work, 10)
    assert sorted(i for _, items in seen for i in items) == list(range(10))
    assert len(seen) == 3 and all(name.startswith("attnreuse-store") for name, _ in seen)
    assert calls == [1, 3]

    def fails(items):
        raise ValueError("a part failed")

    with pytest.raises(ValueError, match="a part failed"):
        processors._on_cores(fails, 10)
    assert calls == [1, 3, 1, 3]
    processors._on_cores(work, 1)  # one item: run here, torch's threads untouched
    assert calls == [1, 3, 1, 3] and seen[-1] == (threading.current_thread().name, [0])


def _parts_seen(count):
    seen = []
    processors._on_cores(lambda items: seen.extend(items), count)
    return sorted(seen)


@pytest.mark.skipif(torch.get_num_threads() < 2 or not hasattr(os, "fork"), reason="needs 2 torch threads and fork")
def test_cpu_store_parts_run_in_a_forked_child():
    """A child forked after a store has none of the parent's pool threads; its stores make their own pool
    instead of waiting forever on the parent's."""
    import multiprocessing

    assert _parts_seen(4) == [0, 1, 2, 3]  # the parent's pool exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_parts_seen, (4,)).get(timeout=60) == [0, 1, 2, 3]


def test_store_and_reuse_calls_backpropagate(sd_pipe):
    """With autograd on (e.g. fine-tuning through a sampler), a store takes the differentiable path."""
    unet = sd_pipe.unet
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, requires_grad=True)
    text = torch.randn(2, 7, unet.config.cross_attention_dim)
    with apply_attention_reuse(unet, Schedule("10")):
        outs = [unet(sample, t, encoder_hidden_states=text).sample for t in (900, 800)]
    sum(o.square().mean() for o in outs).backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0


def test_cpu_map_memory_is_written_over_not_reallocated_and_never_under_a_snapshot(sd_pipe):
    """A layer's next store (in this generation or the next) writes into the memory of its previous map, giving
    the images of fresh memory, and a snapshot's maps stay intact."""
    schedule = Schedule("101010")
    with apply_attention_reuse(sd_pipe, schedule, attention="self") as handle:
        fresh = run(sd_pipe)
        handle.reset()  # gives the kept memory back
        assert handle.state.buffers == {} and handle.stats()["kept_buffer_bytes"] == 0
    pointers = []

    def callback(pipe, i, t, kwargs):
        pointers.append({n: s[1].data_ptr() for n, s in handle.state.slots.items()})
        return kwargs

    with apply_attention_reuse(sd_pipe, schedule, attention="self") as handle:
        for _ in range(2):
            np.testing.assert_array_equal(run(sd_pipe, callback_on_step_end=callback), fresh)
        assert handle.stats()["kept_buffer_bytes"] == handle.stats()["peak_cache_bytes"] > 0
        stored = pointers[0::2]  # after each store call
        assert len(stored) == 6 and all(p == stored[0] for p in stored)
        snapshots = []

        def snap(pipe, i, t, kwargs):  # as the schedule search does: branch after the first store
            if i == 0:
                snapshots.append(handle.state.snapshot())
                snapshots.append({n: s[1].clone() for n, s in snapshots[0][2].items()})
            return kwargs

        run(sd_pipe, callback_on_step_end=snap)
        for name, kept in snapshots[1].items():  # the stores at calls 2 and 4 did not write over these maps
            torch.testing.assert_close(snapshots[0][2][name][1], kept, rtol=0, atol=0)
    assert handle.state.buffers == {}  # remove() gives the memory back


def _held_bytes(state) -> int:
    """Bytes of the cache's slots plus the kept map memory that no slot is using."""
    used = {s[1].data_ptr() for s in state.slots.values() if s[0] == "map"}
    return state.nbytes + sum(t.numel() * t.element_size() for t in state.buffers.values()
                              if t.data_ptr() not in used)


def test_under_a_budget_map_memory_is_kept_within_it_and_choices_depend_on_shapes_only(sd_pipe):
    """With max_cache_bytes the kept CPU map memory is written over in later generations too, the cache and that
    memory together stay within the budget, and a handle that generated at another size first chooses (and
    outputs) as a fresh handle does."""
    schedule = Schedule("101010")
    with apply_attention_reuse(sd_pipe, schedule, attention="self") as handle:
        run(sd_pipe)
        budget = handle.stats()["peak_cache_bytes"] * 2 // 3  # not every layer's map fits
    seen = []

    def callback(pipe, i, t, kwargs):
        state = handle.state
        seen.append((_held_bytes(state), {n: (s[0], s[1].data_ptr() if s[0] == "map" else None)
                                          for n, s in state.slots.items()}))
        return kwargs

    def kinds(kept):
        return {name: kind for name, (kind, _) in kept.items()}

    def generate(size=32):
        seen.clear()
        image = run(sd_pipe, height=size, width=size, callback_on_step_end=callback)
        assert max(h for h, _ in seen) <= budget and _held_bytes(handle.state) <= budget
        return image, seen[0][1]  # after the first store call: what each layer keeps, where its map lives

    with apply_attention_reuse(sd_pipe, schedule, attention="self", max_cache_bytes=budget) as handle:
        first, kept = generate()
        assert set(kinds(kept).values()) == {"map", "qk"}
        assert all(s == kept for _, s in seen[0::2])  # every store call: the same choice and the same memory
        again, kept_again = generate()
        np.testing.assert_array_equal(again, first)
        assert kept_again == kept  # the maps were written over, not reallocated
        large, kept_large = generate(64)  # 4x the tokens: the large layers' maps no longer fit
        assert kinds(kept_large) != kinds(kept) and "qk" in kinds(kept_large).values()
        back, kept_back = generate()
        np.testing.assert_array_equal(back, first)
        assert kinds(kept_back) == kinds(kept)
    with apply_attention_reuse(sd_pipe, schedule, attention="self", max_cache_bytes=budget) as handle:
        fresh, kept_fresh = generate(64)  # a fresh handle at the larger size chooses and generates the same
        np.testing.assert_array_equal(fresh, large)
        assert kinds(kept_fresh) == kinds(kept_large)


@pytest.mark.parametrize("order", ["compile after apply", "apply after compile"])
def test_compiled_unet_matches_eager_with_one_graph_per_kind_of_call(sd_pipe, order):
    from torch._dynamo.utils import counters

    schedule = Schedule("110100")
    with apply_attention_reuse(sd_pipe, schedule):
        eager = run(sd_pipe)
    torch._dynamo.reset()
    counters.clear()
    unet = sd_pipe.unet
    if order == "compile after apply":
        handle = apply_attention_reuse(sd_pipe, schedule)
        sd_pipe.unet = torch.compile(unet, backend="aot_eager")
    else:  # dynamo's own backend: traced and guarded the same way, faster to build
        sd_pipe.unet = torch.compile(unet, backend="eager")
        handle = apply_attention_reuse(sd_pipe, schedule)
    try:
        images = [run(sd_pipe) for _ in range(2)]
        assert handle.stats()["generations"] == 2
    finally:
        handle.remove()
        sd_pipe.unet = unet
        torch._dynamo.reset()
    for image in images:
        np.testing.assert_allclose(image, eager, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3  # compute, store, reuse: a store after a reuse run is no other


def test_compiled_unet_under_a_budget_does_not_recompile_per_generation(sd_pipe):
    """The layers' choices under max_cache_bytes are read inside the compiled graph: the first store (which makes
    the choices) and the later ones (which find them) are two graphs, and no later generation compiles again."""
    from torch._dynamo.utils import counters

    schedule = Schedule("110100")
    with apply_attention_reuse(sd_pipe, schedule) as handle:
        run(sd_pipe)
        budget = handle.stats()["peak_cache_bytes"] * 2 // 3
    with apply_attention_reuse(sd_pipe, schedule, max_cache_bytes=budget):
        eager = run(sd_pipe)
    torch._dynamo.reset()
    counters.clear()
    unet = sd_pipe.unet
    handle = apply_attention_reuse(sd_pipe, schedule, max_cache_bytes=budget)
    sd_pipe.unet = torch.compile(unet, backend="eager")
    graphs = []
    try:
        for _ in range(4):
            np.testing.assert_allclose(run(sd_pipe), eager, atol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
        assert handle.stats()["peak_cache_bytes"] <= budget
    finally:
        handle.remove()
        sd_pipe.unet = unet
        torch._dynamo.reset()
    assert graphs == [4, 4, 4, 4]  # compute, reuse, a store that chooses and a store that keeps the choices


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from attnreuse.kernels import apply_map, attention_with_map
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        for b, h, nq, nk, d in [(2, 3, 70, 77, 40), (1, 2, 130, 130, 64)]:
            q = torch.randn(b, nq, h, d, dtype=dtype).transpose(1, 2)  # strided, as the processor passes it
            k, v = torch.randn(b, h, nk, d, dtype=dtype), torch.randn(b, nk, h, d, dtype=dtype).transpose(1, 2)
            out, a = attention_with_map(q, k, v, d ** -0.5)
            ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * d ** -0.5, -1)
            tol = 1e-3 if dtype == torch.float16 or DEVICE == "cuda" else 1e-6  # Triton's fp32 dot is TF32 on GPU
            assert (a.double().view(b, h, nq, nk) - ref).abs().max() < tol
            assert ((out.double() - (a.double().view(b, h, nq, nk) @ v.double()).transpose(1, 2)).abs().max()
                    < 50 * tol)
            again = apply_map(a, v, 0.5)  # the reuse kernel: A V from the kept map, scaled
            assert (again.double() - 0.5 * out.double()).abs().max() < 50 * tol
    # the processor's store path through the kernel gives the explicit path's result
    from attnreuse import Schedule, apply_attention_reuse, processors
    from attnreuse.bench import build_unet
    DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
    unet, inputs = build_unet("tiny-sd", DEVICE, DTYPE, 2)
    t = torch.tensor(500.0, device=DEVICE)
    results, fused = {}, []
    for name in ("attention_with_map", "apply_map"):
        op = getattr(torch.ops.attnreuse, name)
        setattr(torch.ops.attnreuse, name, lambda *a, op=op, name=name: fused.append(name) or op(*a))
    for impl in ("torch", "kernels"):
        processors.USE_KERNELS = impl == "kernels"
        processors._KERNEL_OK.update({(kernel, DEVICE, DTYPE, d, DTYPE): True for d in (8, 16)
                                      for kernel in ("store", "reuse")})
        with torch.no_grad(), apply_attention_reuse(unet, Schedule("100"), attention="self") as handle:
            results[impl] = [unet(timestep=t, **inputs).sample for _ in range(3)]
    assert sorted(set(fused)) == ["apply_map", "attention_with_map"]  # the kernels served the "kernels" run
    assert len(fused) == 3 * 4  # each of the 4 self-attention layers stores once and reuses twice
    for a, b in zip(*results.values()):
        assert (a - b).abs().max() < (1e-4 if DTYPE == torch.float32 else 2e-2), (a - b).abs().max()
    print("ok")
""")


def test_store_kernel_against_softmax():
    """The Triton store kernel writes softmax(Q K^T * scale) once and returns the A V of that same A. Without a
    GPU it runs in Triton's interpreter; where Triton is not installed (CPU wheels of torch) it cannot run."""
    pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of torch)")
    env = dict(os.environ, TRITON_INTERPRET="0" if torch.cuda.is_available() else "1")
    code = KERNEL_CHECK.replace("dtype=dtype)", "dtype=dtype, device=DEVICE)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_bench_runs_every_mode_and_writes_ratios(tmp_path, capsys):
    from attnreuse.cli import main

    assert main(["bench", "--arch", "tiny-sd", "--batch", "2", "--repeats", "1", "--e2e-repeats", "1",
                 "--schedule", "101", "--device", "cpu", "--out", str(tmp_path)]) == 0
    import json

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


def test_bench_skips_maps_beyond_free_cpu_memory_and_runs_them_under_a_budget(tmp_path, monkeypatch):
    """A CPU process whose maps exceed its memory is killed, so the bench names such a mode instead of running it;
    with --max-cache the same mode runs within that budget."""
    import json

    from attnreuse import bench
    from attnreuse.cli import main

    monkeypatch.setattr(bench, "_available_bytes", lambda: 4 * 2**20)  # tiny-sd's maps: 6.1 MiB in fp32, 3.1 in bf16
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
    from attnreuse import bench, cache
    from attnreuse.hooks import attention_layers

    unet, inputs = bench.build_unet("tiny-sd", "cpu", torch.float32, 2)
    layers = sum(kind == "self" for kind in attention_layers(unet).values())
    found, original = [], cache.ReuseState.buffer
    monkeypatch.setattr(cache.ReuseState, "buffer",
                        lambda self, name, *a: found.append(name in self.buffers) or original(self, name, *a))
    bench.end_to_end(unet, inputs, ["map"], "1010", 2, torch.device("cpu"))
    assert len(found) == 3 * 2 * layers  # warm-up and two timed generations, two stores per layer each
    assert not any(found[:layers]) and all(found[layers:])
