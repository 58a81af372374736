"""Where a reused call should refresh: a table of what reusing one call's output over a segment of calls costs at
the end of sampling, and DPCache's dynamic program over it (Wang et al. 2026, path-aware refresh steps).

The table's entries come from replaying the sampler itself over a recorded trajectory (only the scheduler runs,
never the denoiser), so every sampler weighs an output's error by how far it moves the final latents: the
unweighted change of the output between calls ranks refreshes far worse (issue 25's probe).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["refresh_program", "refresh_sources", "segment_errors", "latent_psnr"]


def refresh_program(errors: list[list[float]], keys: int) -> tuple[int, ...]:
    """The refresh calls (call 0 and at most `keys - 1` more) that minimise the summed error of the segments
    between them, `errors[i][j]` being the error of reusing from refresh i until call j (j = len(errors): the
    end): DPCache's dynamic program over key steps, O(n^2 keys)."""
    n = len(errors)
    best = {(0, 1): (0.0, (0,))}
    for j in range(1, n):
        for k in range(2, keys + 1):
            options = [(best[(i, k - 1)][0] + errors[i][j], best[(i, k - 1)][1] + (j,))
                       for i in range(j) if (i, k - 1) in best]
            if options:
                best[(j, k)] = min(options)
    return min((value[0] + errors[last][n], value[1]) for (last, k), value in best.items())[1]


def refresh_sources(n: int, refreshes) -> list[int]:
    """For each of `n` calls, the call whose output it uses when only `refreshes` compute (call 0 always does):
    itself at a refresh, else the last refresh before it."""
    sources, last = [], 0
    for c in range(n):
        last = c if c in refreshes else last
        sources.append(last)
    return sources


def segment_errors(n: int, final: torch.Tensor, replay: Callable[[int, int], torch.Tensor]) -> list[list[float]]:
    """errors[i][j]: the mean squared error against `final` of the final latents `replay(i, j)` gives, calls
    i+1..j-1 reusing call i (j = n: to the end); zero where nothing is reused."""
    errors = [[0.0] * (n + 1) for _ in range(n)]
    for i in range(n - 1):
        for j in range(i + 2, n + 1):
            errors[i][j] = float(torch.mean((replay(i, j) - final).float() ** 2))
    return errors


def latent_psnr(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of final latents against the reference's, the peak being the reference's range (latents have no
    fixed one); infinite when equal."""
    error = float(torch.mean((latents.float() - reference.float()) ** 2))
    peak = float(reference.max() - reference.min())
    return float("inf") if error == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / error)).item()
