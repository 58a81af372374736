"""What a handle reports: generations and calls, the plan followed and where it came from, and the cache's bytes and
counts per layer."""

from __future__ import annotations

from .cache import slot_bytes

__all__ = ["handle_stats"]


def handle_stats(handle) -> dict:
    """Counts per attention layer since apply or the last reset, the plan of the current (or last) generation
    (`schedule`: its bits, for a plan of one attention unit), and the bytes held in the cache now and at peak."""
    cache, tracker = handle.cache, handle.tracker
    running = tracker.running
    units = running.units if running is not None else {}
    only = units.get("attention") if len(units) == 1 else None
    source = handle.first_use.stats() if handle.first_use is not None else {"plan_source": "given"}
    return {
        "generations": tracker.generations, "calls_in_generation": tracker.call + 1,
        "plan": str(running or ""), "schedule": "".join(map(str, only.bits)) if only else "", **source,
        "cache_bytes": cache.nbytes, "peak_cache_bytes": cache.peak_bytes, "kept_buffer_bytes": cache.memory.nbytes,
        "layers": {name: _layer(handle, name) for name in cache.layers},
    }


def _layer(handle, name: str) -> dict:
    cache = handle.cache
    slot = cache.slots.get(name)
    return {"attention": handle.layout.attention[name], **vars(cache.counts[name]),
            "cache": slot.kind if slot is not None else None,
            "cache_bytes": slot_bytes(slot) if slot is not None else 0}
