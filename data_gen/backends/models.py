"""Image models as backends: our own BAGEL in edit mode, FLUX.1 Kontext, and sampling a checkpoint.

* `BagelEditor`: `inference.Generator.edit(prev_image, instruction, seed)` of `bagel_editor.ckpt`.
* `ModelSampler`: `inference.Generator.generate(prompt, mode="psir", seed=)` of `model_sampler.ckpt`, the
  checkpoint's own trajectory. A stream that broke the format (an untrained model: no tags, no
  `<|im_end|>`) is `Rejected("format_failure")`, its kind also counted under `invalid`; one without any
  turn (a scaled search with no candidate) is `Rejected("empty_sample")`.
* `KontextEditor` runs `diffusers`' FluxKontextPipeline (optional extra: `pip install -e .[kontext]`),
  loaded on the first edit the cache cannot answer, on `kontext.device` in `kontext.dtype`.

A checkpoint is loaded once per process (`loaded_model`: one `Generator` per (ckpt, device, dtype), shared
by the editor and the sampler) and runs one call at a time off the event loop (`ModelRunner`); `--shard
I/N` spreads a prompt file over N processes / GPUs. The adapters take plain callables, so tests and other
models plug in the same way (`BagelEditor(cache, size, fn)`, `ModelSampler(cache, fn)`).

Outputs are cached by (model id, inputs, seed) like every other call; the model id of a checkpoint names
its directory, its weights file's size and mtime, and the sampling settings, so another checkpoint or other
settings never share cached outputs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from bagel_ft.trajectory import Trajectory, image_to_png
from data_gen.backends.base import Canvas
from data_gen.config import BagelEditorConfig, KontextConfig, ModelSamplerConfig
from data_gen.errors import FatalError, Rejected
from inference.call_cache import CallCache, image_text, png_text, text_image
from inference.endpoint import CallStats, Counters
from inference.settings import resolve_device
from scene_graphs import Step

BLANK = (255, 255, 255)  # the canvas a first step edits

GenerateFn = Callable[[Image.Image, str, int], Image.Image]  # (previous image, instruction, seed) -> next image
SampleFn = Callable[[str, int], Trajectory]  # (prompt, seed) -> the model's own trajectory


# ---- our checkpoints, loaded once per process ---------------------------------------------------------------
_LOADED: dict[tuple[str, str, str], Any] = {}
_LOAD_LOCK = threading.Lock()


def loaded_model(ckpt: str, device: str = "auto", dtype: str = "auto") -> Any:
    """The `inference.Generator` of a checkpoint directory, loaded on first use and kept for the process."""
    key = (str(Path(ckpt).resolve()), device, dtype)
    with _LOAD_LOCK:
        if key not in _LOADED:
            if not Path(ckpt).is_dir():
                raise FatalError(f"checkpoint {ckpt!r}: not a directory")
            from inference import Generator  # torch and the model: only when a checkpoint backend is used

            _LOADED[key] = Generator.from_pretrained(ckpt, dtype=dtype, device=device)
        return _LOADED[key]


def checkpoint_id(ckpt: str, settings: dict[str, Any]) -> str:
    """Names a checkpoint's outputs in cache keys: its directory, weights file (size, mtime) and `settings`."""
    from bagel_ft.checkpoint import MODEL_STEMS
    from bagel_ft.weights import INDEX_SUFFIX

    path = Path(ckpt).resolve()
    names = [f"{stem}{suffix}" for stem in MODEL_STEMS for suffix in (".safetensors", INDEX_SUFFIX)]
    weights = next((path / f for f in names if (path / f).is_file()), None)  # a sharded model: its index
    stamp = f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights else "no-weights"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{path}@{stamp}#{digest}"


class ModelRunner:
    """Runs model calls one at a time in a worker thread (one model, one GPU), keeping the event loop free
    for the other parts. One per event loop; the editor and the sampler share it."""

    def __init__(self):
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(fn, *args)


def bagel_edit_fn(cfg: BagelEditorConfig) -> GenerateFn:
    """`Generator.edit` of `cfg.ckpt` with the release's edit CFG and `cfg.timesteps` schedule points."""
    from inference.psir import EDIT_FLOW

    generator = loaded_model(cfg.ckpt, cfg.device, cfg.dtype)
    flow = dataclasses.replace(EDIT_FLOW, num_timesteps=cfg.timesteps)

    def edit(image: Image.Image, instruction: str, seed: int) -> Image.Image:
        return generator.edit(image, instruction, seed=seed, flow=flow)

    return edit


def model_sample_fn(cfg: ModelSamplerConfig, size: int) -> SampleFn:
    """`Generator.generate(prompt, mode=cfg.mode, seed=)` of `cfg.ckpt`, images of `size` x `size` pixels."""
    from inference.settings import Budget, FlowSettings, GenerateOptions, TextSettings

    generator = loaded_model(cfg.ckpt, cfg.device, cfg.dtype)
    try:
        generator.engine.latent_grid(size, size)
    except ValueError as e:  # fail now, not once per prompt
        raise FatalError(f"model_sampler.ckpt {cfg.ckpt!r} cannot draw pipeline.image_size={size}: {e}") from e
    options = GenerateOptions(
        mode=cfg.mode,
        text=TextSettings(max_tokens=cfg.max_turn_tokens, temperature=cfg.temperature, top_p=cfg.top_p),
        flow=FlowSettings(height=size, width=size, num_timesteps=cfg.timesteps),
        budget=Budget(max_steps=cfg.max_steps, max_images=cfg.max_images),
    )

    def sample(prompt: str, seed: int) -> Trajectory:
        return generator.generate(prompt, seed=seed, options=options).trajectory

    return sample


def sampler_settings(cfg: ModelSamplerConfig, size: int) -> dict[str, Any]:
    """What shapes a sample besides the checkpoint (its cache identity)."""
    d = dataclasses.asdict(cfg)
    for k in ("ckpt", "device"):
        d.pop(k)
    return {**d, "size": size}


# ---- editors ------------------------------------------------------------------------------------------------
class _CachedImageEditor:
    """Shared by the editors: a blank first canvas, the cache, and one model call at a time in a thread."""

    name = "image-editor"

    def __init__(self, cache: CallCache, size: int, model_id: str, runner: ModelRunner | None = None):
        self.cache, self.size, self.model_id = cache, size, model_id
        self.runner = runner or ModelRunner()

    def blank(self, steps: list[Step], seed: int) -> Canvas:
        return Canvas(Image.new("RGB", (self.size, self.size), BLANK))

    async def edit(self, prev: Canvas | None, step: Step, seed: int) -> Canvas:
        before = (prev or self.blank([step], seed)).image
        request = {"model": self.model_id, "image": image_to_png(before), "instruction": step.instruction, "seed": seed}
        key, value = self.cache.lookup(f"{self.name}.edit", request)
        if value is None:
            image = await self.runner.run(self._generate, before, step.instruction, seed)
            value = {"png": image_text(image)}
            self.cache.put(key, value)
        return Canvas(text_image(value["png"]))

    def _generate(self, before: Image.Image, instruction: str, seed: int) -> Image.Image:
        raise NotImplementedError


class BagelEditor(_CachedImageEditor):
    """Our BAGEL model in edit mode: `generate_fn(prev_image, instruction, seed) -> image` (`bagel_edit_fn`
    for a checkpoint). The model draws at its VAE geometry (the input's size after `bagel_ft.transforms`'
    resize); the result is brought back to the canvas size, so every image of a record has one size."""

    name = "bagel"

    def __init__(
        self,
        cache: CallCache,
        size: int,
        generate_fn: GenerateFn | None,
        model_id: str = "bagel",
        runner: ModelRunner | None = None,
    ):
        if generate_fn is None:
            raise FatalError(
                "backends.editor=bagel needs a checkpoint (bagel_editor.ckpt) or, from Python, a "
                "generate_fn(prev_image, instruction, seed) -> image"
            )
        super().__init__(cache, size, model_id, runner)
        self.generate_fn = generate_fn

    @classmethod
    def from_checkpoint(cls, cache: CallCache, size: int, cfg: BagelEditorConfig, runner: ModelRunner) -> BagelEditor:
        settings = {"timesteps": cfg.timesteps, "dtype": cfg.dtype}
        return cls(cache, size, bagel_edit_fn(cfg), checkpoint_id(cfg.ckpt, settings), runner)

    def _generate(self, before: Image.Image, instruction: str, seed: int) -> Image.Image:
        image = self.generate_fn(before, instruction, seed).convert("RGB")
        if image.size != before.size:
            image = image.resize(before.size, Image.Resampling.LANCZOS)
        return image


class KontextEditor(_CachedImageEditor):
    """FLUX.1 Kontext [dev] through diffusers' FluxKontextPipeline. The pipeline loads on the first edit the
    cache cannot answer (a re-run served from the cache never loads it), on `kontext.device` in
    `kontext.dtype`. Kontext is given the previous image at the canvas size (no resize to its ~1 MP preferred
    resolutions) and draws at that size: `max_area` is the canvas area, which diffusers otherwise sets to
    1024 x 1024 whatever `height` / `width` say. The noise comes from a CPU generator, so a seed draws the
    same noise on any device."""

    name = "kontext"

    def __init__(self, cache: CallCache, size: int, cfg: KontextConfig, runner: ModelRunner | None = None):
        try:
            import diffusers  # noqa: F401
        except ImportError as e:
            raise FatalError("backends.editor=kontext needs diffusers: pip install -e '.[kontext]'") from e
        self.device, self.dtype = resolve_device(cfg.device, cfg.dtype)
        super().__init__(cache, size, kontext_id(cfg, self.dtype), runner)
        self.cfg = cfg
        self._pipe = None

    def _load(self) -> Any:
        from diffusers import FluxKontextPipeline

        from inference.api import DTYPES

        try:
            pipe = FluxKontextPipeline.from_pretrained(self.cfg.model, dtype=DTYPES[self.dtype])
        except (OSError, ValueError) as e:  # no such folder / repo, or not a Kontext pipeline
            raise FatalError(f"kontext.model {self.cfg.model!r}: cannot load a FluxKontextPipeline: {e}") from e
        multiple = pipe.vae_scale_factor * 2  # VAE stride x the transformer's 2 x 2 latent patches
        if self.size % multiple:
            raise FatalError(
                f"pipeline.image_size={self.size}: {self.cfg.model!r} draws sizes that are multiples of {multiple}"
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def _generate(self, before: Image.Image, instruction: str, seed: int) -> Image.Image:
        import torch

        if self._pipe is None:
            self._pipe = self._load()
        out = self._pipe(
            image=before,
            prompt=instruction,
            height=self.size,
            width=self.size,
            max_area=self.size * self.size,
            _auto_resize=False,
            guidance_scale=self.cfg.guidance,
            num_inference_steps=self.cfg.steps,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        image = out.images[0].convert("RGB")
        if image.size != before.size:  # a diffusers that resizes differently: say so, not a dataset of two sizes
            raise FatalError(f"kontext drew {image.size[0]}x{image.size[1]}, asked for {self.size}x{self.size}")
        return image


def kontext_id(cfg: KontextConfig, dtype: str) -> str:
    """Names a Kontext pipeline's outputs in cache keys: the model (a local folder by its path and its
    transformer weights' sizes and mtimes, like `checkpoint_id`), the dtype, steps and guidance."""
    path = Path(cfg.model)
    model = cfg.model
    if path.is_dir():
        weights = sorted((path / "transformer").glob("*.safetensors"))
        model = f"{path.resolve()}@" + ",".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
    settings = {"dtype": dtype, "steps": cfg.steps, "guidance": cfg.guidance}
    return f"{model}#{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}"


# ---- the sampler ------------------------------------------------------------------------------------------
class ModelSampler:
    """The checkpoint's own PSIR trajectory for a prompt: `sample_fn(prompt, seed) -> Trajectory`
    (`model_sample_fn` for a checkpoint). A stream that ended in a format failure is cached as such and
    `Rejected("format_failure", why)` on every run."""

    name = "model"

    def __init__(
        self,
        cache: CallCache,
        sample_fn: SampleFn | None,
        model_id: str = "bagel",
        runner: ModelRunner | None = None,
        counters: Counters | None = None,
    ):
        if sample_fn is None:
            raise FatalError(
                "backends.sampler=model needs a checkpoint (model_sampler.ckpt) or, from Python, a "
                "sample_fn(prompt, seed) -> Trajectory"
            )
        self.cache, self.sample_fn, self.model_id = cache, sample_fn, model_id
        self.runner = runner or ModelRunner()
        self.counters = counters if counters is not None else CallStats()

    @classmethod
    def from_checkpoint(
        cls, cache: CallCache, size: int, cfg: ModelSamplerConfig, runner: ModelRunner, counters: Counters
    ) -> ModelSampler:
        settings = sampler_settings(cfg, size)
        return cls(cache, model_sample_fn(cfg, size), checkpoint_id(cfg.ckpt, settings), runner, counters)

    async def sample(self, prompt: str, seed: int) -> Trajectory:
        key, value = self.cache.lookup("model.sample", {"model": self.model_id, "prompt": prompt, "seed": seed})
        if value is None:
            value = sample_value(await self.runner.run(self.sample_fn, prompt, seed))
            self.cache.put(key, value)
        if "rejected" in value:  # the stream gave no trajectory to critique
            failure = value["failure"]
            if value["rejected"] == "format_failure":
                self.counters.count("invalid", failure_kind(failure.get("reason", "")))  # like an invalid reply
            where = f"step {failure['step']}: " if "step" in failure else ""
            text = f": {failure['text'][:80]!r}" if failure.get("text") else ""
            raise Rejected(value["rejected"], f"{where}{failure.get('reason', '')}{text}")
        return Trajectory.from_row({**value, "images": [text_image(t) for t in value["images"]]})


def sample_value(draft: Trajectory) -> dict[str, Any]:
    """The cache value of a sampled trajectory: its row (images as PNG text), or why there is none:
    `format_failure` (the stream broke the format) or `empty_sample` (it ended before any turn)."""
    if draft.meta.get("stop_reason") == "format_failure":
        return {"rejected": "format_failure", "failure": draft.meta.get("failure") or {}}
    if not draft.turns:
        reason = f"the stream ended ({draft.meta.get('stop_reason', 'no stop reason')}) before any turn"
        return {"rejected": "empty_sample", "failure": {"reason": reason}}
    row = draft.to_row()
    return {**row, "images": [png_text(png) for png in row["images"]]}


def failure_kind(reason: str) -> str:
    """A format failure's reason as a counter key (inference.psir.text_turn writes the reasons)."""
    if reason.startswith("unterminated"):
        return "unterminated_turn"
    if reason.startswith("no PSIR tags"):
        return "no_psir_tags"
    return "malformed_tags"
