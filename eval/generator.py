"""The one interface every benchmark draws through: `(prompt, seed) -> Generation`.

A generator is any callable with a `name`; the benchmarks never know whether it is our model in
single-pass / PSIR / scaled mode, an oracle, or a test double. `load_generator(spec, mode)` turns a
`--ckpt` value into one:

  DIR                 a checkpoint directory, drawn by `inference` (`InferenceGenerator`)
  oracle:shapes       renders the parsed shapes-world prompt exactly (`ShapesOracleGenerator`): an upper
                      bound for ShapesEval rows and an end-to-end check of the judge; not a model
  debug:noise         deterministic noise images, zero cost: CPU smoke runs of the eval plumbing only
  py:MODULE:FACTORY   `FACTORY(mode=...)` from an importable module: plug in any generator

Many samples: `generate_many(generator, jobs, batch_size)` draws every (prompt, seed) job and yields each
Generation as it finishes; a generator with its own `generate_many(jobs, batch_size)` (our model) runs
them batched, each sample seeded by itself (the same images as one at a time), others run one by one.

Cost accounting (`Generation.cost`, per generated sample, i.e. per prompt drawn once):
  images      images the model generated (drafts included), flow_steps  denoising steps in total,
  tokens      text tokens generated, wall_s  seconds of wall time (filled in by `generate` if absent;
              in a batch, the sample's share: each step's time split evenly among the samples in it).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from bagel_ft.trajectory import Trajectory
from common.config import ConfigError

MODES = ("single", "psir", "scaled")
COST_KEYS = ("images", "flow_steps", "tokens", "wall_s")
BLANK_SIZE = 256  # px, side of the stand-in image when a generator returns none


@dataclass
class Generation:
    image: Image.Image  # the final image
    trajectory: Trajectory | None = None  # the PSIR stream that produced it, when the generator has one
    cost: dict[str, float] = field(default_factory=dict)  # keys of COST_KEYS
    no_image: bool = False  # the generator returned no image; `image` is a black stand-in
    failure: dict[str, Any] | None = None  # the format failure that ended a PSIR stream (inference.psir's)


@runtime_checkable
class ImageGenerator(Protocol):
    name: str  # recorded in the run config; identifies the generator for resuming

    def __call__(self, prompt: str, seed: int) -> Generation: ...


def generate(generator: ImageGenerator, prompt: str, seed: int) -> Generation:
    """Call `generator`, timing it when it does not report wall time itself. A generator that gave up
    (no final image, e.g. a PSIR stream that never drew) is scored on a black image, flagged `no_image`."""
    start = time.perf_counter()
    return _finish(generator(prompt, seed), time.perf_counter() - start)


def generate_many(
    generator: ImageGenerator, jobs: list[tuple[str, int]], batch_size: int | None = None
) -> Iterator[tuple[int, Generation]]:
    """`generate` for every (prompt, seed) job -> (index in jobs, Generation) as each one finishes. A
    generator with a `generate_many(jobs, batch_size)` method runs them batched (batch_size None: its
    default), any other one job after the other."""
    if hasattr(generator, "generate_many"):
        start = time.perf_counter()
        for index, gen in generator.generate_many(jobs, batch_size):
            yield index, _finish(gen, time.perf_counter() - start)
            start = time.perf_counter()
        return
    for index, (prompt, seed) in enumerate(jobs):
        yield index, generate(generator, prompt, seed)


def _finish(gen: Any, wall_s: float) -> Generation:
    """A generator's answer as a Generation: wall time if it reported none, black stand-in if no image."""
    if not isinstance(gen, Generation):
        gen = Generation(gen.image, getattr(gen, "trajectory", None), _cost_dict(getattr(gen, "cost", None)))
    gen.cost.setdefault("wall_s", wall_s)
    if gen.failure is None and gen.trajectory is not None:
        gen.failure = gen.trajectory.meta.get("failure")
    if gen.trajectory is not None and not gen.trajectory.turns:
        gen.trajectory = None  # nothing to show (and format v1 has no empty records)
    if gen.image is None:
        gen.image, gen.no_image = Image.new("RGB", (BLANK_SIZE, BLANK_SIZE)), True
    return gen


def sample_seed(base: int, index: int, sample: int) -> int:
    """The seed of sample `sample` of prompt `index`: fixed, so a resumed run redraws the same image."""
    return base + 1000 * index + sample


# ---- generators ----------------------------------------------------------------------------------
class NoiseGenerator:
    """Deterministic per-(prompt, seed) noise: exercises the eval plumbing, measures nothing."""

    def __init__(self, size: int = 64, mode: str = "single"):
        self.size = size
        self.name = "debug:noise"

    def __call__(self, prompt: str, seed: int) -> Generation:
        digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
        rng = random.Random(digest)
        image = Image.frombytes("RGB", (self.size, self.size), rng.randbytes(3 * self.size * self.size))
        return Generation(image=image, cost={"images": 0, "flow_steps": 0, "tokens": 0})


class ShapesOracleGenerator:
    """ORACLE, not a model: draws the shapes-world scene graph parsed from the prompt with the world's
    own renderer. Scores the judge's ceiling (and tests it end to end); report rows say "oracle"."""

    def __init__(self, size: int = 64, mode: str = "single"):
        from scene_graphs import shapes  # B's shapes world; imported lazily (only this generator needs it)

        self._shapes = shapes
        self.size = size
        self.name = "oracle:shapes"

    def __call__(self, prompt: str, seed: int) -> Generation:
        image, _layout = self._shapes.render(self._shapes.parse_prompt(prompt), size=self.size, seed=seed)
        return Generation(image=image, cost={"images": 0, "flow_steps": 0, "tokens": 0})


class InferenceGenerator:
    """Our model through `inference.Generator` (single | psir | scaled), one prompt at a time.

    `config` is the inference YAML (configs/eval/inference_*.yaml): `load:` keyword arguments of
    `Generator.from_pretrained` (dtype, device, tokenizer) and `options:` fields of `GenerateOptions`
    (flow, text, budget, scaling, verifier, ...), nested as in the dataclasses; absent = the checkpoint's
    `inference.yaml` (inference.settings.checkpoint_options), else inference's defaults.
    A PSIR / scaled stream that draws nothing is scored on a black stand-in (`generate`), unless the config
    sets inference's `options.fallback_image: true` (a single-mode image instead: a different method, label it)."""

    def __init__(self, ckpt: str, mode: str = "single", config: dict[str, Any] | None = None):
        from inference import Generator  # engineer E's package; eval never imports training
        from inference.settings import resolve_options

        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        config = dict(config or {})
        unknown = set(config) - {"load", "options"}
        if unknown:
            raise ConfigError(f"inference config: unknown sections {sorted(unknown)}; expected load, options")
        options = resolve_options(ckpt, config.get("options") or {}, {"mode": mode})  # the checkpoint's defaults below
        self.mode = mode
        self.name = f"inference:{mode}"
        self._generator = Generator.from_pretrained(ckpt, options, **(config.get("load") or {}))

    def with_mode(self, mode: str) -> InferenceGenerator:
        """The same loaded model in another mode (no reload)."""
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        other = copy.copy(self)
        other.mode, other.name = mode, f"inference:{mode}"
        return other

    def __call__(self, prompt: str, seed: int) -> Generation:
        return self._generation(self._generator.generate(prompt, mode=self.mode, seed=seed))

    def generate_many(
        self, jobs: list[tuple[str, int]], batch_size: int | None = None
    ) -> Iterator[tuple[int, Generation]]:
        """Every (prompt, seed) job batched (`inference.Generator.generate_many`; None = its default size)."""
        for index, result in self._generator.generate_many(jobs, mode=self.mode, batch_size=batch_size):
            yield index, self._generation(result)

    @staticmethod
    def _generation(result: Any) -> Generation:
        traj = result.trajectory if result.trajectory is not None and result.trajectory.turns else None
        failure = result.trajectory.meta.get("failure") if result.trajectory is not None else None
        return Generation(image=result.image, trajectory=traj, cost=_cost_dict(result.cost), failure=failure)


def _cost_dict(cost: Any) -> dict[str, float]:
    """A cost (dict or dataclass of counters) as {key: float} over COST_KEYS."""
    if dataclasses.is_dataclass(cost):
        cost = dataclasses.asdict(cost)
    return {k: float(v) for k, v in (cost or {}).items() if k in COST_KEYS}


def load_generator(spec: str, mode: str = "single", config: dict[str, Any] | None = None) -> ImageGenerator:
    """A generator from a `--ckpt` value (see the module docstring); `config` is the inference YAML."""
    if spec == "debug:noise":
        return NoiseGenerator(mode=mode)
    if spec == "oracle:shapes":
        return ShapesOracleGenerator(mode=mode)
    if spec.startswith("py:"):
        module_name, _, attr = spec[3:].partition(":")
        factory = getattr(importlib.import_module(module_name), attr or "make_generator")
        return factory(mode=mode)
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"--ckpt {spec!r}: not a checkpoint directory (nor oracle:shapes, debug:noise, py:M:F)")
    return InferenceGenerator(spec, mode=mode, config=config)
