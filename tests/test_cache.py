"""The cache: lookahead stores, what each mode keeps, the memory budget, fp8 maps, kept CPU map memory."""

import numpy as np
import torch
from helpers import STEPS, CallCounter, attention_modules, run

from attnreuse import Schedule, apply_attention_reuse
from attnreuse.attention import processor
from attnreuse.search.utility import psnr


def test_lookahead_stores_exactly_the_maps_a_later_call_reuses(sd_pipe, monkeypatch):
    made = []
    for maker in ("attention_map", "map_store_cpu"):  # the one-shot map and the CPU blockwise store
        original = getattr(processor, maker)
        monkeypatch.setattr(processor, maker, lambda *a, _f=original, **k: made.append(1) or _f(*a, **k))
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
        assert handle.cache.memory.buffers == {} and handle.stats()["kept_buffer_bytes"] == 0
    pointers = []

    def callback(pipe, i, t, kwargs):
        pointers.append({n: s.attn_map.data_ptr() for n, s in handle.cache.slots.items()})
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
                snapshots.append(handle.snapshot()[1][0])
                snapshots.append({n: s.attn_map.clone() for n, s in snapshots[0].items()})
            return kwargs

        run(sd_pipe, callback_on_step_end=snap)
        for name, kept in snapshots[1].items():  # the stores at calls 2 and 4 did not write over these maps
            torch.testing.assert_close(snapshots[0][name].attn_map, kept, rtol=0, atol=0)
    assert handle.cache.memory.buffers == {}  # remove() gives the memory back


def _held_bytes(cache) -> int:
    """Bytes of the cache's slots plus the kept map memory that no slot is using."""
    used = {s.attn_map.data_ptr() for s in cache.slots.values() if s.kind == "map"}
    return cache.nbytes + sum(t.numel() * t.element_size() for t in cache.memory.buffers.values()
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
        cache = handle.cache
        seen.append((_held_bytes(cache), {n: (s.kind, s.attn_map.data_ptr() if s.kind == "map" else None)
                                          for n, s in cache.slots.items()}))
        return kwargs

    def kinds(kept):
        return {name: kind for name, (kind, _) in kept.items()}

    def generate(size=32):
        seen.clear()
        image = run(sd_pipe, height=size, width=size, callback_on_step_end=callback)
        assert max(h for h, _ in seen) <= budget and _held_bytes(handle.cache) <= budget
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
