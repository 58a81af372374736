"""An evaluation's report: `eval.json` (every figure, the settings, the environment), `eval.md` (the table and the
matched-latency pairs), `pareto.png` and the labelled `grid.png`. `replot` redraws the Pareto plot of a stored
`eval.json` with the families and styles the method registry gives now, without running anything."""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_write, read_json, write_json, written_together
from .methods import REGISTRY, family
from .plots import method_grid, pareto_plot
from .runner import MATCH_TOLERANCE, environment

__all__ = ["write_report", "replot", "EXTRA_COLUMNS"]

EXTRA_COLUMNS = {"clip_score": "CLIP score", "lpips": "LPIPS", "fid": "FID"}  # opt-in, see metrics.load_extra_metrics


def _table(rows: list[dict], extras: list[str]) -> list[str]:
    header = "| method | latency vs full | latency / image (s) | peak memory (MiB) | PSNR (dB) | SSIM | faithfulness |"
    lines = [header + "".join(f" {EXTRA_COLUMNS[m]} |" for m in extras),
             "|---|---|---|---|---|---|---|" + "---|" * len(extras)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | not run: {r['error'][:120]} | | | | | |" + " |" * len(extras))
            continue
        faith = f"{100 * r['faithfulness']:.0f}%" if "faithfulness" in r else ""
        lines.append(f"| {r['method']} | {r['latency_ratio']:.2f}x | {r['latency_s']:.3f} | "
                     f"{r['peak_memory_mib']:.0f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {faith} |"
                     + "".join(f" {r[m]:.4g} |" for m in extras))
    return lines


def _matched(pairs: list[dict]) -> list[str]:
    if not pairs:
        return []
    lines = ["", f"Matched latency (nearest step-reduced baseline by measured latency; 'no' where the latencies "
             f"differ by more than {MATCH_TOLERANCE:.2f} of full):", "",
             "| method | latency | baseline | its latency | matched | PSNR | baseline PSNR | gain (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {m['method']} | {m['latency_ratio']:.2f}x | {m['baseline']} | "
                    f"{m['baseline_latency_ratio']:.2f}x | {'yes' if m['matched'] else 'no'} | {m['psnr_db']:.2f} | "
                    f"{m['baseline_psnr_db']:.2f} | {m['psnr_gain_db']:+.2f} |" for m in pairs]


def write_report(result: dict, out, settings: dict, pipe, prompts: list[str], columns: int = 6) -> dict:
    """Write the report's files into `out`, as one set (an earlier report there stays whole until the new one is
    whole); returns what `eval.json` holds."""
    with written_together():
        return _write_report(result, Path(out), settings, pipe, prompts, columns)


def _write_report(result: dict, out: Path, settings: dict, pipe, prompts: list[str], columns: int) -> dict:
    report = {"settings": settings, "environment": environment(pipe), "prompts": prompts,
              "rows": result["rows"], "matched": result["matched"]}
    write_json(out / "eval.json", report)
    extras = [m for m in EXTRA_COLUMNS if any(m in r for r in result["rows"])]
    lines = [f"{settings['sampler']} {settings['num_steps']} steps, guidance {settings['guidance_scale']}, "
             f"{len(prompts)} prompts x seeds, {report['environment']['device']}", "", *_table(result["rows"], extras)]
    searched = [r for r in result["rows"] if "schedule_file" in r]
    if searched:
        lines += ["", "Searched schedules (1 = compute; calibration prompts never evaluated here): "
                  + "; ".join(f"{r['method']} `{r['schedule']}` ({r['schedule_file']})" for r in searched)]
    planned = [r for r in result["rows"] if "plan_file" in r]
    if planned:
        lines += ["", "Searched plans (per unit, 1 = compute; searched on the calibration prompts; predicted latency "
                  "beside the measured one):", ""]
        lines += [f"- {r['method']}: `{r['plan']}`, predicted {r['predicted_latency']:.3f}x, measured "
                  f"{r['latency_ratio']:.3f}x ({r['plan_file']})" for r in planned]
    lines += _matched(result["matched"])
    text = "\n".join(lines) + "\n"
    atomic_write(out / "eval.md", lambda tmp: tmp.write_text(text))
    _pareto(result["rows"], settings, out / "pareto.png")
    labels = method_grid(result, out / "grid.png", columns)
    atomic_write(out / "grid.txt", lambda tmp: tmp.write_text("rows, top to bottom: " + ", ".join(labels) + "\n"))
    return report


def _pareto(rows: list[dict], settings: dict, path) -> None:
    """The Pareto plot of a report's rows, the planner's family (`plan:B`) drawn as the frontier."""
    pareto_plot(rows, path, f"{settings['sampler']} {settings['num_steps']} steps: fidelity against latency",
                lines=(REGISTRY["plan"].family,))


def replot(json_path, path=None, refresh: bool = False) -> Path:
    """Redraw the Pareto plot of a stored report (`eval.json`, or a copy such as docs/results/dit/eval_ddim20.json)
    without running anything: each row's family is read afresh from the method registry (`eval.methods.family`),
    so a report written while a method's family was wrong is drawn as it is now. `path`: the PNG, by default beside
    the JSON (`eval.json` -> `pareto.png`, `eval_X.json` -> `pareto_X.png`, `X.json` -> `pareto_X.png`);
    `refresh`: also write the fresh families into the JSON. Returns the PNG's path."""
    json_path = Path(json_path)
    report = read_json(json_path, "report")
    rows = [dict(row, family=family(row["method"])) for row in report["rows"]]
    if refresh and rows != report["rows"]:
        write_json(json_path, dict(report, rows=rows))
    if path is None:
        stem = json_path.stem
        name = "pareto" if stem == "eval" else "pareto_" + stem.removeprefix("eval_")
        path = json_path.with_name(name + ".png")
    _pareto(rows, report["settings"], path)
    return Path(path)
