"""Searching reuse schedules: PHAST (the paper's Algorithm 1) and exhaustive search, with shared prefixes.

The utility of a schedule is the mean PSNR of its final images against the no-reuse images of the same prompts
and seeds (paper sec. 3.1). Two schedules whose per-call plans agree on their first k calls produce the same
latents, scheduler state and cached maps up to call k, so `Evaluator` runs the candidates in sorted order and
resumes each one from the deepest state it shares with the candidate before it (a depth-first walk of the trie
of plans): a PHAST sweep costs a fraction of its (N - r) * r full generations, and the result is bit for bit
what a full run gives.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import plan_actions
from .hooks import apply_attention_reuse
from .metrics import psnr
from .schedule import Schedule

__all__ = ["Evaluator", "phast", "exhaustive", "bit_flips", "named_schedules", "search_schedule", "cached_phast",
           "schedule_cache_dir", "PSNR_CAP"]

PSNR_CAP = 100.0  # dB: an image identical to its reference counts as this, so that means stay finite


def _key(bits) -> str:
    return "".join(map(str, bits))


def _model_name(pipe) -> str:
    return str(getattr(pipe, "name_or_path", "") or type(pipe.unet).__name__)


class Evaluator:
    """Mean PSNR of reuse schedules on a calibration set, against the no-reuse images (computed once).

    Args:
        pipe: a diffusers Stable Diffusion pipeline (its scheduler is the sampler searched for).
        prompts, seeds: the calibration set; image i is prompt i with a generator seeded by seeds[i], the
            initial noise the pipeline itself would draw. All images run as one batch.
        num_inference_steps, guidance_scale: as in the pipeline call.
        state_file (*optional*): JSON where every utility is written as soon as it is known; an interrupted
            search run again with the same file skips what was done.

    `calls` counts denoiser calls (each over the whole batch); `naive_calls` what full generations would cost.
    """

    def __init__(self, pipe, prompts: list[str], seeds: list[int], num_inference_steps: int = 20,
                 guidance_scale: float = 7.5, state_file: str | Path | None = None, progress: bool = False):
        if len(prompts) != len(seeds):
            raise ValueError(f"Need one seed per prompt; got {len(prompts)} prompts and {len(seeds)} seeds.")
        self.pipe, self.prompts, self.seeds = pipe, list(prompts), list(seeds)
        self.num_steps, self.guidance = num_inference_steps, guidance_scale
        self.calls, self.naive_calls, self.progress = 0, 0, progress
        self.utilities: dict[str, float] = {}
        self.state_file = Path(state_file) if state_file else None
        if self.state_file and self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            if saved.get("setup") != self.setup:
                raise ValueError(f"{self.state_file} was written for another search setup: {saved.get('setup')}; "
                                 "use another --state file or delete it.")
            self.utilities = saved["utilities"]
            self.calls, self.naive_calls = saved.get("calls", 0), saved.get("naive_calls", 0)
        self._prepare()
        self._path: list[tuple[str, tuple]] = []  # (action, state after it) along the last candidate run
        self.references = self._final_images(self._run(Schedule.all_compute(num_inference_steps).bits, count=False))

    @property
    def setup(self) -> dict:
        """What the utilities depend on (a resumed search must match it)."""
        return {"model": _model_name(self.pipe), "sampler": type(self.pipe.scheduler).__name__, "num_inference_steps": self.num_steps,
                "guidance_scale": self.guidance, "prompts": self.prompts, "seeds": self.seeds}

    # -- the sampler loop (as StableDiffusionPipeline.__call__ runs it) ---------------------------------
    @torch.no_grad()
    def _prepare(self) -> None:
        pipe = self.pipe
        device = pipe.unet.device
        self.cfg = self.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        positive, negative = pipe.encode_prompt(self.prompts, device, 1, self.cfg)
        self.embeds = torch.cat([negative, positive]) if self.cfg else positive
        pipe.scheduler.set_timesteps(self.num_steps, device=device)
        self.timesteps = pipe.scheduler.timesteps
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        generators = [torch.Generator(device).manual_seed(s) for s in self.seeds]
        latents = pipe.prepare_latents(len(self.prompts), pipe.unet.config.in_channels, size, size,
                                       self.embeds.dtype, device, generators)
        self._start = (latents, copy.deepcopy(pipe.scheduler))

    @torch.no_grad()
    def _step(self, latents, scheduler, t):
        x = torch.cat([latents] * 2) if self.cfg else latents
        x = scheduler.scale_model_input(x, t)
        eps = self.pipe.unet(x, t, encoder_hidden_states=self.embeds, return_dict=False)[0]
        if self.cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + self.guidance * (cond - uncond)
        return scheduler.step(eps, t, latents, return_dict=False)[0]

    @torch.no_grad()
    def _final_images(self, latents) -> np.ndarray:
        vae = self.pipe.vae
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()

    def _run(self, bits, count=True):
        """Final latents of one schedule, resumed from the deepest state shared with the previous run."""
        plan = plan_actions(tuple(bits))
        depth = 0
        while depth < min(len(self._path), len(plan) - 1) and self._path[depth][0] == plan[depth]:
            depth += 1
        del self._path[depth:]
        handle = apply_attention_reuse(self.pipe.unet, Schedule(bits))
        try:
            if depth:
                latents, scheduler, snapshot = self._path[-1][1]
                handle.state.restore(snapshot, plan)
            else:
                latents, scheduler = self._start
                handle.state.start(tuple(bits))
            scheduler = copy.deepcopy(scheduler)
            for s in range(depth, len(plan)):
                latents = self._step(latents, scheduler, self.timesteps[s])
                self._path.append((plan[s], (latents, copy.deepcopy(scheduler), handle.state.snapshot())))
            self.calls += (len(plan) - depth) if count else 0
        finally:
            handle.remove()
        return latents

    # -- utilities ---------------------------------------------------------------------------------------
    def psnr(self, images: np.ndarray) -> float:
        """Mean over images of the PSNR (dB, capped at PSNR_CAP) against the no-reuse images."""
        pairs = zip(images, self.references)
        return float(np.mean([min(PSNR_CAP, psnr(image, reference)) for image, reference in pairs]))

    def __call__(self, schedules) -> list[float]:
        """Utilities of the schedules (known ones are not run again), running the new ones in sorted order."""
        schedules = [Schedule(s) for s in schedules]
        for s in schedules:
            if len(s) != self.num_steps:
                raise ValueError(f"Schedule {s!r} has {len(s)} entries; this search runs {self.num_steps} steps.")
        todo = sorted({_key(s.bits): s for s in schedules if _key(s.bits) not in self.utilities}.values(),
                      key=lambda s: plan_actions(s.bits))
        for s in tqdm(todo, desc="schedules", disable=not self.progress, dynamic_ncols=True):
            self.utilities[_key(s.bits)] = self.psnr(self._final_images(self._run(s.bits)))
            self.naive_calls += self.num_steps
            self._save()
        return [self.utilities[_key(s.bits)] for s in schedules]

    def _save(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setup": self.setup, "utilities": self.utilities, "calls": self.calls,
                                   "naive_calls": self.naive_calls}, indent=1))
        tmp.replace(self.state_file)

    def describe(self, schedule: Schedule, **meta) -> Schedule:
        """The schedule with its timesteps and the search's metadata, as `Schedule.to_json` writes it."""
        info = dict(self.setup, psnr_db=self([schedule])[0], evaluations=len(self.utilities),
                    model_calls=self.calls, naive_model_calls=self.naive_calls, **meta)
        return Schedule(schedule.bits, [float(t) for t in self.timesteps], dict(schedule.meta, **info))


def bit_flips(bits) -> list[tuple[int, ...]]:
    """All schedules one swap of a reuse step with a compute step away (the number of reuse steps is kept;
    the first step always computes)."""
    ones = [i for i, b in enumerate(bits) if b and i > 0]
    zeros = [i for i, b in enumerate(bits) if not b]
    out = []
    for i, j in itertools.product(ones, zeros):
        flipped = list(bits)
        flipped[i], flipped[j] = 0, 1
        out.append(tuple(flipped))
    return out


def phast(utility, num_steps: int, reuse_steps: int, epsilon: float = 0.0, start=None,
          max_sweeps: int = 100) -> tuple[Schedule, list[dict]]:
    """PHAST (paper Algorithm 1): hill-climb from HURRY by swapping one reuse step with one compute step.

    Each sweep scores every swap of the sweep's starting schedule (BitFlipSet fixed per sweep) in one batch and
    walks them in order, keeping a swap whose utility beats the best so far by more than `epsilon`; it stops
    after a sweep without improvement. `utility` maps a list of schedules to their utilities (an `Evaluator`).
    Returns the best schedule and the history of sweeps.
    """
    best = tuple(Schedule(start).bits if start is not None else Schedule.hurry(num_steps, reuse_steps).bits)
    opt = utility([best])[0]
    history = [{"sweep": 0, "schedule": _key(best), "utility": opt, "candidates": 1}]
    for sweep in range(1, max_sweeps + 1):
        candidates = bit_flips(best)
        scores = utility(candidates)
        start_opt, chosen = opt, best
        for candidate, score in zip(candidates, scores):
            if score > opt + epsilon:
                chosen, opt = candidate, score
        best = chosen
        history.append({"sweep": sweep, "schedule": _key(best), "utility": opt, "candidates": len(candidates)})
        if opt == start_opt:
            break
    return Schedule(best, meta={"strategy": "phast", "epsilon": epsilon, "sweeps": len(history) - 1}), history


def exhaustive(utility, num_steps: int, reuse_steps: int) -> list[tuple[Schedule, float]]:
    """Every schedule with `reuse_steps` reuse steps (the first step computes: C(N-1, r) of them), ranked by
    utility, best first."""
    if num_steps > 16:
        raise ValueError(f"Exhaustive search is for small N (<= 16); C({num_steps - 1}, {reuse_steps}) schedules "
                         "would take too long. Use phast instead.")
    schedules = []
    for zeros in itertools.combinations(range(1, num_steps), reuse_steps):
        schedules.append(tuple(0 if i in zeros else 1 for i in range(num_steps)))
    scores = utility(schedules)
    ranked = sorted(zip(schedules, scores), key=lambda p: -p[1])
    return [(Schedule(bits, meta={"strategy": "exhaustive"}), score) for bits, score in ranked]


def named_schedules(names, num_steps: int, reuse_steps: int, timesteps=None, seed: int = 0):
    """(name, Schedule) pairs for `hurry`, `early` (reuse steps 2..r+1), `random:K` (K schedules with r reuse
    steps, seeded), a bit string or a schedule JSON file. A JSON schedule of another length or sampler is moved
    to `timesteps` by nearest timestep (paper sec. 3.1)."""
    rng = np.random.default_rng(seed)
    for name in names:
        if name == "hurry":
            yield name, Schedule.hurry(num_steps, reuse_steps)
        elif name == "early":
            yield name, Schedule([1] + [0] * reuse_steps + [1] * (num_steps - 1 - reuse_steps))
        elif name.startswith("random"):
            for k in range(int(name.partition(":")[2] or 1)):
                zeros = set(rng.choice(np.arange(1, num_steps), size=reuse_steps, replace=False).tolist())
                yield f"random {k + 1}", Schedule([0 if i in zeros else 1 for i in range(num_steps)])
        elif name.endswith(".json"):
            schedule = Schedule.from_json(Path(name))
            if schedule.timesteps is not None and timesteps is not None:
                schedule = schedule.for_timesteps([float(t) for t in timesteps])
            yield f"{Path(name).stem} ({schedule.meta.get('strategy', 'file')})", schedule
        else:
            yield name, Schedule(name)


def search_schedule(pipe, prompts: list[str], seeds: list[int], num_steps: int, reuse_steps: int,
                    guidance_scale: float = 7.5, epsilon: float = 0.0, exhaustive_search: bool = False,
                    state_file=None, progress: bool = False, **meta) -> Schedule:
    """PHAST (or, with `exhaustive_search`, every schedule) on a calibration set: the best schedule with its
    timesteps and the metadata `attnreuse search` writes (HURRY's PSNR for comparison, the sweeps or the ranking,
    the search cost), shared by that command and the evaluation's `phast:R`."""
    evaluator = Evaluator(pipe, prompts, seeds, num_steps, guidance_scale, state_file=state_file, progress=progress)
    meta = dict(meta, reuse_steps=reuse_steps,
                hurry_psnr_db=evaluator([Schedule.hurry(num_steps, reuse_steps)])[0])
    if exhaustive_search:
        ranked = exhaustive(evaluator, num_steps, reuse_steps)
        best = ranked[0][0]
        meta["ranking"] = [[str(s), round(u, 3)] for s, u in ranked]
    else:
        best, history = phast(evaluator, num_steps, reuse_steps, epsilon=epsilon)
        meta.update(strategy="phast", epsilon=epsilon, history=history)
    return evaluator.describe(best, **meta)


def schedule_cache_dir() -> Path:
    """Where searched schedules are kept: `$ATTNREUSE_CACHE/schedules`, by default ~/.cache/attnreuse/schedules."""
    import os

    return Path(os.environ.get("ATTNREUSE_CACHE") or Path.home() / ".cache" / "attnreuse") / "schedules"


def cached_phast(pipe, prompts: list[str], seeds: list[int], num_steps: int, reuse_steps: int,
                 guidance_scale: float = 7.5, progress: bool = False) -> Path:
    """The schedule JSON of PHAST for this model, sampler, N, r, guidance and calibration set, searched on the first
    call and read back on later ones: a search costs minutes, an evaluation that names `phast:R` should not pay it
    every time. The file name says the setup; a hash of the sampler's config and the calibration prompts and seeds
    tells apart setups that the name does not."""
    import hashlib
    import os
    import re

    model, sampler = _model_name(pipe), type(pipe.scheduler).__name__
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    digest = hashlib.sha1(json.dumps([model, config, num_steps, reuse_steps, guidance_scale, list(prompts),
                                      list(seeds)], sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^\w.-]+", "_", Path(model).name or model)
    path = schedule_cache_dir() / (f"{slug}-{sampler}-n{num_steps}-r{reuse_steps}-g{guidance_scale:g}"
                                   f"-c{len(prompts)}-{digest}.json")
    if not path.exists():
        schedule = search_schedule(pipe, prompts, seeds, num_steps, reuse_steps, guidance_scale, progress=progress,
                                   cache_key=path.stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # data-parallel processes may search the same setup at once
        schedule.to_json(tmp, indent=1)
        tmp.replace(path)
    return path
