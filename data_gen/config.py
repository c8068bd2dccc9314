"""Typed configuration of a data-synthesis run: defaults -> YAML (`--config`) -> dotted overrides (`--set`).

Every run writes its resolved config to `OUT/config.yaml`. With no endpoint configured every backend is
the offline shapes world; `configs/data/gpt4o.yaml` and `configs/data/vllm_qwen.yaml` point the
extractor and the judge at an OpenAI-compatible server (`endpoint:` is `inference.endpoint.EndpointConfig`);
`configs/data/critiques_from_ckpt.yaml` samples and edits with one of our checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inference.endpoint import EndpointConfig
from inference.settings import DTYPE_NAMES

EXTRACTORS = ("shapes", "llm")
EDITORS = ("shapes", "bagel", "kontext")
JUDGES = ("shapes", "vlm")
SAMPLERS = ("shapes", "model")
SAMPLER_MODES = ("psir", "scaled")  # inference modes whose streams have plan turns to critique


class ConfigError(ValueError):
    """A data config file or override is invalid; the message names the field, expected and got."""


@dataclass
class BackendsConfig:
    """Which implementation plays each part (see data_gen/backends)."""

    extractor: str = "shapes"  # prompt -> scene graph: shapes (parse the grammar) | llm
    editor: str = "shapes"  # (previous image, step) -> image: shapes | bagel (bagel_editor.ckpt) | kontext
    judge: str = "shapes"  # (image, step) -> verdict: shapes (exact check) | vlm
    sampler: str = "shapes"  # critiques: prompt -> a draft: shapes (imperfect drafter) | model (model_sampler.ckpt)


@dataclass
class ShapesConfig:
    """The offline shapes world."""

    categories: list[str] | None = None  # prompt categories for generated prompts (None = all)
    mistake_prob: float = 0.5  # imperfect drafter: chance that one step of a sampled trajectory is wrong


@dataclass
class KontextConfig:
    """FLUX.1 Kontext editor (`backends.editor: kontext`, `pip install -e .[kontext]`): diffusers'
    FluxKontextPipeline draws each step at pipeline.image_size (a multiple of 16 for FLUX.1), given the
    previous image at that size. The pipeline loads on the first edit a run cannot take from the call cache."""

    model: str = "black-forest-labs/FLUX.1-Kontext-dev"  # diffusers repo id or local pipeline folder
    device: str = "auto"  # auto = cuda if available, else cpu
    steps: int = 28  # denoising steps per edit
    guidance: float = 2.5  # FLUX guidance embedding (diffusers' guidance_scale)
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU | fp32 | bf16 | fp16


@dataclass
class BagelEditorConfig:
    """Our checkpoint as the image editor (`backends.editor: bagel`): `inference.Generator.edit`, the
    release's edit CFG. The model is loaded once per process (shared with `model_sampler` on the same ckpt)."""

    ckpt: str = ""  # checkpoint directory (bagel_ft layout)
    timesteps: int = 50  # flow schedule points per edit
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU | fp32 | bf16 | fp16


@dataclass
class ModelSamplerConfig:
    """A checkpoint's own PSIR trajectories (`backends.sampler: model`): `inference.Generator.generate`, drawn
    at pipeline.image_size. The judge then checks them like the drafter's (critiques.py)."""

    ckpt: str = ""  # checkpoint directory (bagel_ft layout)
    mode: str = "psir"  # psir (the native loop) | scaled (inference-time search; its verifier: `self`)
    timesteps: int = 50  # flow schedule points per image
    max_turn_tokens: int = 256  # tokens per text turn
    temperature: float = 0.0  # text sampling (0 = greedy; the seed still varies the images)
    top_p: float = 1.0  # nucleus mass (1 = off)
    max_steps: int = 8  # text turns per stream
    max_images: int = 4  # images per stream
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU | fp32 | bf16 | fp16


@dataclass
class PipelineConfig:
    """Shapes of the synthesized records."""

    image_size: int = 128  # pixels per side of every drawn image (shapes editor: 32..256; its judge is exact from 128)
    min_steps: int = 3  # trajectories: fewest intermediate images (plans shorter than this are rejected)
    max_steps: int = 5  # trajectories: most intermediate images
    edit_prob: float = 0.5  # trajectories: chance of each semantic rewrite (modify / swap / remove) in a plan
    inspect_every_step: bool = True  # trajectories: an inspect(consistent) turn after every image, not only the last
    negatives_per_positive: int = 2  # alignment: negatives per positive pair
    repair_attempts: int = 1  # llm extractor: re-asks (with the error) after an invalid scene graph
    chunk_size: int = 64  # prompts per output parquet file (the unit of resume)


@dataclass
class DataConfig:
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    backends: BackendsConfig = field(default_factory=BackendsConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    kontext: KontextConfig = field(default_factory=KontextConfig)
    bagel_editor: BagelEditorConfig = field(default_factory=BagelEditorConfig)
    model_sampler: ModelSamplerConfig = field(default_factory=ModelSamplerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cache_dir: str = ""  # call cache; "" = OUT/cache. Share one between runs to reuse paid calls

    def validate(self) -> None:
        b, p = self.backends, self.pipeline
        checks = [
            (b.extractor in EXTRACTORS, f"backends.extractor: expected one of {EXTRACTORS}, got {b.extractor!r}"),
            (b.editor in EDITORS, f"backends.editor: expected one of {EDITORS}, got {b.editor!r}"),
            (b.judge in JUDGES, f"backends.judge: expected one of {JUDGES}, got {b.judge!r}"),
            (b.sampler in SAMPLERS, f"backends.sampler: expected one of {SAMPLERS}, got {b.sampler!r}"),
            (
                1 <= p.min_steps <= p.max_steps,
                f"pipeline: need 1 <= min_steps <= max_steps, got {p.min_steps}, {p.max_steps}",
            ),
            (
                p.negatives_per_positive >= 0,
                f"pipeline.negatives_per_positive: expected >= 0, got {p.negatives_per_positive}",
            ),
            (
                b.editor != "shapes" or 32 <= p.image_size <= 256,
                f"pipeline.image_size: the shapes editor draws 32..256 px, got {p.image_size}",
            ),
            (p.chunk_size >= 1, f"pipeline.chunk_size: expected >= 1, got {p.chunk_size}"),
            (
                0.0 <= self.shapes.mistake_prob <= 1.0,
                f"shapes.mistake_prob: expected in [0, 1], got {self.shapes.mistake_prob}",
            ),
            (0.0 <= p.edit_prob <= 1.0, f"pipeline.edit_prob: expected in [0, 1], got {p.edit_prob}"),
            (
                b.editor != "bagel" or bool(self.bagel_editor.ckpt),
                "backends.editor=bagel needs bagel_editor.ckpt (a checkpoint directory)",
            ),
            (
                b.sampler != "model" or bool(self.model_sampler.ckpt),
                "backends.sampler=model needs model_sampler.ckpt (a checkpoint directory)",
            ),
            (
                self.kontext.dtype in ("auto", *DTYPE_NAMES),
                f"kontext.dtype: expected one of {('auto', *DTYPE_NAMES)}, got {self.kontext.dtype!r}",
            ),
            (self.kontext.steps >= 1, f"kontext.steps: expected >= 1, got {self.kontext.steps}"),
            (
                self.model_sampler.mode in SAMPLER_MODES,
                f"model_sampler.mode: expected one of {SAMPLER_MODES}, got {self.model_sampler.mode!r}",
            ),
        ]
        uses_endpoint = b.extractor == "llm" or b.judge == "vlm"
        checks.append(
            (
                not uses_endpoint or (self.endpoint.base_url and self.endpoint.model),
                "backends use an endpoint (llm extractor / vlm judge) but endpoint.base_url or endpoint.model is empty",
            )
        )
        errors = [msg for ok, msg in checks if not ok] + self.endpoint.problems("endpoint")
        if errors:
            raise ConfigError("invalid data config:\n  " + "\n  ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that shapes the records (not concurrency, timeouts, cache location)."""
        d = self.to_dict()
        for k in ("timeout_s", "max_attempts", "backoff_base_s", "backoff_max_s", "concurrency"):
            d["endpoint"].pop(k)
        d.pop("cache_dir")
        d["kontext"].pop("device")
        if self.backends.editor != "kontext":  # counts where it draws (so adding the field changed no fingerprint)
            d["kontext"].pop("dtype")
        # a checkpoint section counts only when its backend is used (so adding one changed no fingerprint)
        for section, used in (
            ("bagel_editor", self.backends.editor == "bagel"),
            ("model_sampler", self.backends.sampler == "model"),
        ):
            if used:
                d[section].pop("device")
            else:
                d.pop(section)
        d["pipeline"].pop("chunk_size")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> DataConfig:
    """Defaults, then the YAML file, then `section.field=value` overrides (values parsed as YAML)."""
    cfg = DataConfig()
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
        for section, values in data.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    _set(cfg, f"{section}.{key}", value, where=str(path))
            else:
                _set(cfg, section, values, where=str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), yaml.safe_load(value), where="--set")
    cfg.validate()
    return cfg


def save_config(cfg: DataConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _set(cfg: DataConfig, dotted: str, value: Any, where: str) -> None:
    *parents, name = dotted.split(".")
    obj = cfg
    for p in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            raise ConfigError(f"{where}: unknown config section {dotted!r}")
        obj = getattr(obj, p)
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if name not in fields:
        raise ConfigError(f"{where}: unknown config field {dotted!r}; known: {sorted(fields)}")
    default = getattr(type(obj)(), name)
    if dataclasses.is_dataclass(default):
        raise ConfigError(f"{where}: {dotted!r} is a section, set its fields instead")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"{where}: {dotted}: expected bool, got {value!r}")
    if (
        isinstance(default, int)
        and not isinstance(default, bool)
        and (isinstance(value, bool) or not isinstance(value, int))
    ):
        raise ConfigError(f"{where}: {dotted}: expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {dotted}: expected a number, got {value!r}")
        value = float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: {dotted}: expected a string, got {value!r}")
    setattr(obj, name, value)
