"""Every option of inference, as typed dataclasses in one place (no torch import: the CLI's --help and
config readers stay fast). `GenerateOptions` nests them; the CLI flags and eval's YAML `options:` map
onto these fields one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bagel_ft.transforms import ImageGeometry  # noqa: F401  (re-exported: part of the inference options)
from common import config as config_io
from common.endpoint import EndpointConfig

MODES = ("single", "psir", "scaled")  # prompt -> one image | the native loop | P x I x k search
VERIFIERS = ("self", "shapes", "vlm")  # the model's inspect step | shapes-world judge | OpenAI-compatible critic
DECISIONS = ("two_way", "three_way")  # draw/stop rule at <|im_end|> (inference.psir.decide)
RENORM_TYPES = ("global", "channel", "text_channel")  # bagel_ft.flow.cfg_combine
DTYPE_NAMES = ("fp32", "bf16", "fp16")
CHECKPOINT_OPTIONS = "inference.yaml"  # beside image_geometry.json: how the checkpoint draws by default


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """("auto" or a torch device, "auto" or one of DTYPE_NAMES) -> both named: device auto = cuda if available
    (under torchrun: the rank's own GPU, cuda:$LOCAL_RANK), else cpu; dtype auto = bf16 on a GPU, fp32 on CPU."""
    if device == "auto":
        import os

        import torch  # only here: this module stays torch-free to import

        device = "cpu"
        if torch.cuda.is_available():
            device = f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected auto or one of {DTYPE_NAMES}, got {dtype!r}")
    return device, dtype


@dataclass
class TextSettings:
    """How a text turn is decoded."""

    max_tokens: int = 256  # tokens generated per text turn (the stop token included)
    temperature: float = 0.0  # 0 = greedy (official do_sample=False)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)


@dataclass
class FlowSettings:
    """How an image is generated (official `generate_image` arguments; defaults = the release's t2i demo)."""

    height: int = 0  # pixels, a multiple of the model's latent_downsample; 0 = as large as the model draws (<= 1024)
    width: int = 0  # pixels; 0 = as large as the model draws (<= 1024)
    num_timesteps: int = 50  # schedule points incl. t = 0, i.e. num_timesteps - 1 Euler steps
    timestep_shift: float = 3.0  # s in t <- s t / (1 + (s - 1) t); > 1 spends more steps near noise
    cfg_text_scale: float = 4.0  # guidance against the context without the last text (1 = off)
    cfg_img_scale: float = 1.0  # guidance against the context without images (1 = off; 1.5-2 for edits)
    cfg_interval: tuple[float, float] = (0.4, 1.0)  # CFG applies where interval[0] < t <= interval[1]
    cfg_renorm_type: str = "global"  # one of RENORM_TYPES
    cfg_renorm_min: float = 0.0  # lower clamp of the renorm factor


@dataclass
class Budget:
    """Limits of one PSIR stream (whichever is hit first ends it)."""

    max_steps: int = 8  # text turns
    max_images: int = 4  # generated images
    max_tokens: int = 2048  # text tokens generated over all turns


@dataclass
class PSIRSettings:
    text: TextSettings = field(default_factory=TextSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)
    budget: Budget = field(default_factory=Budget)
    decision: str = "three_way"  # one of DECISIONS


@dataclass
class ScalingSettings:
    streams: int = 2  # P: parallel streams (width)
    iterations: int = 3  # I: PSIR steps per stream (depth)
    candidates: int = 2  # k: candidates per step, the verifier keeps the best
    rollback: bool = True  # return to the best earlier state when the best candidate scores lower
    use_sub_prompt: bool = True  # force the verifier's sub_prompt as the next `<refine>` turn


@dataclass
class CriticEndpoint(EndpointConfig):
    """The `vlm` verifier's OpenAI-compatible server with image input (every field: `EndpointConfig`); a
    critic sits inside the search loop, so it waits less and retries less. No key is needed on 127.0.0.1."""

    timeout_s: float = 60.0  # per request
    max_attempts: int = 3  # tries per request on 429 / 5xx / timeout / connection error
    max_tokens: int = 512  # the reply is one small JSON object


@dataclass
class GenerateOptions:
    mode: str = "psir"  # one of MODES
    seed: int = 0  # text sampling and flow noise
    text: TextSettings = field(default_factory=TextSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)
    budget: Budget = field(default_factory=Budget)
    decision: str = "three_way"  # draw/stop rule at <|im_end|>: one of DECISIONS
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    verifier: str = "self"  # one of VERIFIERS (scaled mode)
    critic: CriticEndpoint = field(default_factory=CriticEndpoint)  # the vlm verifier's endpoint
    fallback_image: bool = False  # a psir/scaled run that drew nothing returns a single-mode image (meta says so)

    def psir(self) -> PSIRSettings:
        return PSIRSettings(self.text, self.flow, self.budget, self.decision)


# ---- a checkpoint's own sampling defaults ---------------------------------------------------------------
def checkpoint_options(ckpt: str | Path) -> dict[str, Any]:
    """The `options:` of `ckpt/inference.yaml` ({} when the checkpoint has none or `ckpt` is no directory): the
    sampling defaults `generate`, `eval` and `demo` start from, under any YAML or flag the user gives. Same
    schema as the `options:` section of an eval inference YAML (configs/eval/inference_*.yaml)."""
    path = Path(ckpt) / CHECKPOINT_OPTIONS
    if not path.is_file():
        return {}
    data = config_io.read_yaml(path)
    unknown = set(data) - {"options"}
    if unknown:
        raise config_io.ConfigError(f"{path}: unknown sections {sorted(unknown)}; expected options")
    options = data.get("options") or {}
    config_io.build(GenerateOptions, options, where=str(path), prefix="options.")  # refuse a bad file when read
    return options


def resolve_options(ckpt: str | Path, *layers: dict[str, Any]) -> GenerateOptions:
    """GenerateOptions: inference's defaults < the checkpoint's inference.yaml < each of `layers` (mappings)."""
    data = checkpoint_options(ckpt)
    for layer in layers:
        data = config_io.merge(data, layer)
    return config_io.build(GenerateOptions, data, prefix="options.")


def save_checkpoint_options(ckpt: str | Path, options: dict[str, Any], note: str = "") -> Path:
    """Write `ckpt/inference.yaml` ({"options": options}, checked against GenerateOptions first)."""
    config_io.build(GenerateOptions, options, prefix="options.")
    header = "# how this checkpoint draws by default (inference.settings.checkpoint_options)"
    text = f"{header}{'; ' + note if note else ''}\n" + yaml.safe_dump({"options": options}, sort_keys=False)
    path = Path(ckpt) / CHECKPOINT_OPTIONS
    path.write_text(text)
    return path
