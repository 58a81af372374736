"""`attnreuse bench`'s tables in markdown: per call (ratios to the plain calls around each) and end to end."""

from __future__ import annotations

from .calls import gib

__all__ = ["markdown"]


def _heading(r: dict) -> list[str]:
    s = r["setup"]
    budget = s.get("max_cache_bytes")
    reduced = "".join(f", {s[k]} {k.replace('_', ' ')}" for k in ("layers", "text_tokens") if s.get(k))
    lines = [f"### {s['arch']} {s['resolution']}x{s['resolution']}{reduced}, batch {s['batch']}, {s['dtype']}"
             f"{', torch.compile' if s['compiled'] else ''}"
             f"{f', cache budget {gib(budget)}' if budget is not None else ''} on {s['device']}", ""]
    if "attention_share" in r:
        lines += [f"Attention modules take {r['attention_share']['self']:.1%} (self) and "
                  f"{r['attention_share']['cross']:.1%} (cross) of a plain call: all that a reuse call can skip.", ""]
    ao = r["attention_only"]
    b_, h_, t_, d_ = ao["shape"]
    return lines + [f"Attention only, the largest self-attention layer (batch {b_}, {h_} heads, {t_} tokens, head "
                    f"dim {d_}; map {ao['map_mib']:.0f} MiB): " + ", ".join(
                        f"{name} {row['ms']:.3f} ms ({row['x']:.2f}x)" for name, row in ao.items()
                        if isinstance(row, dict)), ""]


def _per_call(pc: dict) -> list[str]:
    lines = ["Per call; each ratio is the median over rounds of the call's time over the mean of the plain calls just "
             "before and after it in the same sequence. Operators: aten operators other than views in one call (about "
             "one kernel launch each on a GPU), counted in the warm-up round:", "",
             "| mode | plain call | first store call | store call | reuse call | cache | operators: plain / store "
             "/ reuse |", "|---|---|---|---|---|---|---|",
             f"| stock processors (sdpa) | {pc['sdpa']['ms']:.2f} ms | | | | | {pc['sdpa'].get('ops', '')} |"]
    for name, row in pc.items():
        if "skipped" in row:
            lines.append(f"| {name} | {row['skipped']} | | | | | |")
        elif "store_ms" in row:
            ops = " / ".join(str(n) for n in row["ops"].values()) if "ops" in row else ""
            lines.append(f"| {name} | {row['plain_ms']:.2f} ms | " + " | ".join(
                f"{row[k + '_ms']:.2f} ms ({row[k + '_x']:.2f}x)" for k in ("first_store", "store", "reuse"))
                + f" | {row['cache_mib']:.0f} MiB | {ops} |")
    return lines


def _end_to_end(e2e: dict, schedule: str, loop: str = "ddim-cfg") -> list[str]:
    kind = "DDIM with CFG" if loop == "ddim-cfg" else "flow-matching Euler loop (the batch as given)"
    lines = ["", f"End to end, {len(schedule)}-step {kind}, schedule `{schedule}` (blocks: the same bits for every "
             "transformer block's residual):", "",
             "| mode | time | speed-up (medians) | speed-up (each run against the baselines around it) "
             "| RMS change of the final latents | cache |", "|---|---|---|---|---|---|"]
    for name, row in e2e.items():
        if "skipped" in row:
            lines.append(f"| {name} | {row['skipped']} | | | | |")
            continue
        extra = (f"{row['speedup_local']:.3f}x | {row['rms_latent_change']:.4f} | {row['cache_mib']:.0f} MiB"
                 if "cache_mib" in row else " | | ")
        lines.append(f"| {name} | {row['ms']:.0f} ms | {row['speedup']:.3f}x | {extra} |")
    return lines


def markdown(results: list[dict]) -> str:
    """Tables of `bench` results, one section per architecture and batch."""
    lines = []
    for r in results:
        lines += _heading(r) + _per_call(r["per_call"])
        if "end_to_end" in r:
            lines += _end_to_end(r["end_to_end"], r["setup"]["schedule"], r["setup"].get("loop", "ddim-cfg"))
        lines.append("")
    return "\n".join(lines)
