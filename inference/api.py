"""The Python API: `Generator` (a loaded model + options) and `generate(...)`, the same options as the CLI.

    from inference import Generator, GenerateOptions
    gen = Generator.from_pretrained("runs/tiny-model", GenerateOptions(mode="psir"))
    result = gen.generate("a red circle left of a blue square", seed=0)
    result.image                       # final PIL image
    result.trajectory                  # bagel_ft.trajectory.Trajectory (docs/format.md)
    result.cost                        # Cost(images, flow_steps, tokens, wall_s)
    result.save("out/")                # PNGs + trajectory.json + index.html

Modes: `single` (prompt -> one image, official t2i), `psir` (the native loop, inference.psir), `scaled`
(P streams x I iterations x k candidates with a verifier, inference.scaling).

Many prompts: `gen.generate_many([(prompt, seed), ...], batch_size=16)` yields (index, Result) as each finishes;
single and psir samples run batched (`inference.batching`: one packed forward per tick for all samples in
flight, ragged), each seeded by itself, so every result is the one `generate(prompt, seed=seed)` gives.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bagel_ft.trajectory import Trajectory
from inference.batching import Steps, batchable, run_batched
from inference.engine import Engine
from inference.html import render_html
from inference.psir import EDIT_FLOW, Cost, run_edit, run_psir, run_single
from inference.scaling import search
from inference.settings import MODES, FlowSettings, GenerateOptions, ImageGeometry, resolve_device
from inference.verifiers import Verifier, build_verifier

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    prompt: str
    image: Image.Image | None  # the final image
    trajectory: Trajectory  # the stream that produced it (format v1)
    cost: Cost
    search: dict[str, Any] | None = None  # scaled mode: every candidate's score and the search events

    def save(self, out_dir: str | Path, name: str | None = None) -> Path:
        """Write `<out_dir>/<name>/`: NN.png per image, final.png, trajectory.json, index.html -> that folder."""
        folder = Path(out_dir) / (name or self.trajectory.id)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(self.trajectory.images):
            paths.append(f"{i:02d}.png")
            image.save(folder / paths[-1])
        if self.image is not None:
            self.image.save(folder / "final.png")
        row = self.trajectory.to_row()
        row.pop("images")
        row["image_paths"] = paths
        row["final_image"] = "final.png" if self.image is not None else None
        (folder / "trajectory.json").write_text(json.dumps(row, indent=1, default=str) + "\n")
        (folder / "index.html").write_text(render_html(self.trajectory, image_paths=paths))
        return folder


class Generator:
    """A loaded engine + default options. `generate(prompt, mode=, seed=)` also serves eval's generator API."""

    def __init__(self, engine: Engine, options: GenerateOptions | None = None, verifier: Verifier | None = None):
        self.engine = engine
        self.options = options or default_options(engine)
        self._given_verifier = verifier  # used in scaled mode whatever options.verifier says
        self._built: dict[str, Verifier] = {}

    @classmethod
    def from_pretrained(
        cls,
        ckpt: str | Path,
        options: GenerateOptions | None = None,
        dtype: str = "auto",
        device: str = "auto",
        tokenizer: str = "auto",
        geometry: ImageGeometry | dict | None = None,
        verifier: Verifier | None = None,
        attn_backend: str = "sdpa",
    ) -> Generator:
        """dtype auto = bf16 on GPU, fp32 on CPU; device auto = cuda if available (under torchrun: the rank's
        own GPU, cuda:$LOCAL_RANK)."""
        device, dtype = resolve_device(device, dtype)
        engine = Engine.from_pretrained(ckpt, DTYPES[dtype], device, tokenizer, geometry, attn_backend)
        return cls(engine, options, verifier)

    def verifier(self, options: GenerateOptions) -> Verifier:
        """The verifier given at construction, else the one `options.verifier` names (built once)."""
        if self._given_verifier is not None:
            return self._given_verifier
        if options.verifier not in self._built:
            self._built[options.verifier] = build_verifier(options.verifier, self.engine, options.critic)
        return self._built[options.verifier]

    def resolve(
        self, mode: str | None = None, seed: int | None = None, options: GenerateOptions | None = None
    ) -> GenerateOptions:
        """The options of one call: `options` (else the generator's), with `mode` / `seed` if given."""
        opts = dataclasses.replace(
            options or self.options, **{k: v for k, v in {"mode": mode, "seed": seed}.items() if v is not None}
        )
        if opts.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {opts.mode!r}")
        return opts

    @batchable
    def generate(
        self, prompt: str, mode: str | None = None, seed: int | None = None, options: GenerateOptions | None = None
    ) -> Steps[Result]:
        opts = self.resolve(mode, seed, options)
        meta = {
            "seed": opts.seed,
            "source": f"inference:{opts.mode}",
            "mode": opts.mode,
            "settings": _settings_dict(opts),
        }
        if opts.mode == "single":
            stream = yield from run_single.steps(self.engine, prompt, opts.flow, opts.seed)
            return Result(prompt, stream.last_image, stream.to_trajectory(meta), stream.cost)
        if opts.mode == "psir":
            stream = yield from run_psir.steps(self.engine, prompt, opts.psir(), opts.seed)
            result = Result(prompt, stream.last_image, stream.to_trajectory(meta), stream.cost)
        else:
            found = search(self.engine, prompt, self.verifier(opts), opts.psir(), opts.scaling, opts.seed)
            report = {
                "verifier": opts.verifier,
                "candidates": [c.to_dict() for c in found.candidates],
                "events": found.events,
                "best": found.best.to_dict() if found.best else None,
            }
            stream = found.best.state if found.best else (found.candidates[0].state if found.candidates else None)
            traj = stream.to_trajectory({**meta, "search": report}) if stream else Trajectory(prompt, [], meta=meta)
            result = Result(prompt, found.image, traj, found.cost, report)
        if result.image is None and opts.fallback_image:
            single = yield from run_single.steps(self.engine, prompt, opts.flow, opts.seed)
            result.image = single.last_image
            result.cost.add(single.cost)
            result.trajectory.meta["fallback_image"] = "the stream drew no image; final.png is a single-mode image"
        return result

    def generate_many(
        self,
        jobs: Iterable[tuple[str, int]],
        mode: str | None = None,
        options: GenerateOptions | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[int, Result]]:
        """`generate(prompt, seed=seed)` for every (prompt, seed) of `jobs`, up to `batch_size` samples in flight
        (None: `default_batch_size`) -> (index in jobs, Result) as each one finishes. Scaled mode runs one
        prompt at a time (its search calls the verifier between steps). In a batch, `cost.wall_s` is the
        sample's share of the wall time (each tick's time split evenly among the samples in it)."""
        opts = self.resolve(mode, None, options)
        if batch_size is None:
            batch_size = default_batch_size(self.engine, opts.flow)
        if opts.mode == "scaled":
            batch_size = 1
        programs = (self.generate.steps(prompt, seed=seed, options=opts) for prompt, seed in jobs)
        for done in run_batched(self.engine, programs, batch_size):
            if batch_size > 1:
                done.value.cost.wall_s = done.wall_s
            yield done.index, done.value

    def edit(
        self, image: Image.Image, instruction: str, seed: int | None = None, flow: FlowSettings | None = None
    ) -> Image.Image:
        """Edit `image` by `instruction` (official edit mode; the release's edit CFG unless `flow` is given;
        output size = the input's after the VAE resize). data_gen's `bagel` editor can call this."""
        image, _cost = run_edit(
            self.engine,
            image,
            instruction,
            flow or dataclasses.replace(EDIT_FLOW, num_timesteps=self.options.flow.num_timesteps),
            self.options.seed if seed is None else seed,
        )
        return image


def default_options(engine: Engine) -> GenerateOptions:
    """Defaults: images as large as the model can draw, up to 1024x1024 (32x32 for the tiny model)."""
    height, width = engine.image_size(FlowSettings())
    return GenerateOptions(flow=FlowSettings(height=height, width=width))


def default_batch_size(engine: Engine, flow: FlowSettings) -> int:
    """Samples in flight when none is asked for: 16 on CPU (the tiny models' forwards are Python-overhead
    bound, so more samples per forward is nearly free); on a GPU as many as keep one flow forward (3 CFG
    branches per sample) under ~48K tokens: 4 at 1024 px on a 7B model, 16 at 512 px."""
    if engine.device.type == "cpu":
        return 16
    h, w = engine.latent_grid(*engine.image_size(flow))
    return max(1, min(16, 49152 // (3 * (h * w + 2))))


def _settings_dict(opts: GenerateOptions) -> dict[str, Any]:
    """The options recorded with every trajectory (the critic endpoint without any key: it holds none)."""
    d = dataclasses.asdict(opts)
    for k in ("mode", "seed"):
        d.pop(k)
    if opts.mode != "scaled":
        for k in ("scaling", "verifier", "critic"):
            d.pop(k)
    return d


def load(ckpt: str | Path, **kwargs: Any) -> Generator:
    """`Generator.from_pretrained(ckpt, **kwargs)`; eval's `InferenceGenerator` entry point."""
    return Generator.from_pretrained(ckpt, **kwargs)


def generate(
    prompt: str,
    ckpt: str | Path | None = None,
    generator: Generator | None = None,
    mode: str | None = None,
    seed: int | None = None,
    options: GenerateOptions | None = None,
    **load_kwargs: Any,
) -> Result:
    """One-shot: load `ckpt` (or use `generator`) and generate for one prompt."""
    if generator is None:
        if ckpt is None:
            raise ValueError("generate: give ckpt or generator")
        generator = Generator.from_pretrained(ckpt, options, **load_kwargs)
    return generator.generate(prompt, mode=mode, seed=seed, options=options)
