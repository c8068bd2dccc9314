"""Typed configuration of a Bagel model, mirroring the official checkpoint files.

A checkpoint directory holds `llm_config.json` (Qwen2 + `qk_norm`/`layer_module`), `vit_config.json`
(SigLIP), and optionally `vae_config.json` (FLUX AutoEncoderParams) and `bagel_config.json` (latent
patching, position tables). The release ships neither of the last two: their absence means the release's
values (`VAEConfig()` / `BagelArchConfig()` defaults below).

Presets (the named table of sizes):
  * `bagel-7b-mot`: the released BAGEL-7B-MoT (ByteDance-Seed/BAGEL-7B-MoT `llm_config.json`,
    `vit_config.json`, `app.py` overrides; FLUX.1 `ae.safetensors` params of `load_ae`).
  * `tiny`: the architecture of `shared/reference/tiny` (2 layers, hidden 64, byte-tokenizer vocab 320),
    for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError  # the one config error of every package (re-exported here)

LAYER_MODULES = ("Qwen2DecoderLayer", "Qwen2MoTDecoderLayer")


@dataclass
class LLMConfig:
    """Qwen2 language model (`llm_config.json`)."""

    vocab_size: int = 152064  # rows of embed_tokens / lm_head (Qwen2.5 pads past the tokenizer's 151665)
    hidden_size: int = 3584
    intermediate_size: int = 18944  # SwiGLU inner width
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4  # GQA: query head h reads kv head h // (heads / kv_heads)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    qk_norm: bool = True  # RMSNorm on q and k per head, before RoPE (BAGEL addition)
    layer_module: str = "Qwen2MoTDecoderLayer"  # or dense "Qwen2DecoderLayer" (no *_moe_gen weights)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_mot(self) -> bool:
        return self.layer_module == "Qwen2MoTDecoderLayer"


@dataclass
class ViTConfig:
    """SigLIP NaViT encoder (`vit_config.json`).

    `num_hidden_layers` is the JSON value; like the official loader we build one layer fewer
    (penultimate-layer features: 27 in the file -> 26 built), see `num_layers_built`.
    """

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    @property
    def num_layers_built(self) -> int:
        return self.num_hidden_layers - 1

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VAEConfig:
    """FLUX AutoEncoderParams (`vae_config.json`; absent in the release, whose values are the defaults)."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8  # spatial factor = 2 ** (len(ch_mult) - 1)
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass
class BagelArchConfig:
    """Bagel glue (`bagel_config.json`; absent in the release, whose values are the defaults)."""

    latent_patch_size: int = 2  # latent tokens are p x p patches of the VAE latent
    max_latent_size: int = 64  # side of the latent position table (tokens)
    vit_max_num_patch_per_side: int = 70  # side of the ViT position tables
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False  # only "extrapolate" position ids are supported (the release's mode)
    timestep_shift: float = 1.0  # training timestep shift s: t <- s t / (1 + (s - 1) t)
    visual_gen: bool = True
    visual_und: bool = True


@dataclass
class BagelConfig:
    """Everything needed to build a `Bagel`."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    arch: BagelArchConfig = field(default_factory=BagelArchConfig)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def patch_latent_dim(self) -> int:
        """Features of one latent token: p * p * z_channels (64 for the release)."""
        return self.arch.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE downsample * latent patch size (16 for the release)."""
        return self.vae.downsample * self.arch.latent_patch_size

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> BagelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]()

    # ---- files -----------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> BagelConfig:
        """Read the official config files of a checkpoint directory (vae/bagel files optional)."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: not a checkpoint directory")
        llm = _read_section(path / "llm_config.json", LLMConfig, required=True)
        vit = _read_section(path / "vit_config.json", ViTConfig, required=True)
        vae = _read_section(path / "vae_config.json", VAEConfig, required=False)
        arch = _read_section(path / "bagel_config.json", BagelArchConfig, required=False)
        cfg = cls(llm=llm, vit=vit, vae=vae, arch=arch)
        cfg.validate(source=str(path))
        return cfg

    def files(self) -> dict[str, dict[str, Any]]:
        """The four config files' contents by file name (official keys plus ours), as `save_dir` writes them."""
        llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **dataclasses.asdict(self.llm)}
        llm.update(rope_scaling=None, use_sliding_window=False, attention_dropout=0.0)
        vit = {"model_type": "siglip_vision_model", **dataclasses.asdict(self.vit)}
        return {
            "llm_config.json": llm,
            "vit_config.json": vit,
            "vae_config.json": dataclasses.asdict(self.vae),
            "bagel_config.json": dataclasses.asdict(self.arch),
        }

    def save_dir(self, path: str | Path) -> None:
        """Write the four config files into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (path / name).write_text(json.dumps(data, indent=1) + "\n")

    def validate(self, source: str = "config") -> None:
        llm, vit = self.llm, self.vit
        checks = [
            (
                llm.layer_module in LAYER_MODULES,
                f"llm.layer_module: expected one of {LAYER_MODULES}, got {llm.layer_module!r}",
            ),
            (
                llm.hidden_size % llm.num_attention_heads == 0,
                f"llm.hidden_size {llm.hidden_size} not divisible by num_attention_heads {llm.num_attention_heads}",
            ),
            (
                llm.num_attention_heads % llm.num_key_value_heads == 0,
                f"llm.num_attention_heads {llm.num_attention_heads} not divisible by num_key_value_heads {llm.num_key_value_heads}",
            ),
            (llm.head_dim % 2 == 0, f"llm head_dim {llm.head_dim} must be even for RoPE"),
            (
                vit.hidden_size % vit.num_attention_heads == 0,
                f"vit.hidden_size {vit.hidden_size} not divisible by num_attention_heads {vit.num_attention_heads}",
            ),
            (
                vit.num_layers_built >= 1,
                f"vit.num_hidden_layers must be >= 2 (one is dropped), got {vit.num_hidden_layers}",
            ),
            (
                2 ** (len(self.vae.ch_mult) - 1) == self.vae.downsample,
                f"vae.downsample {self.vae.downsample} != 2**(len(ch_mult)-1) for ch_mult {self.vae.ch_mult}",
            ),
            (
                llm.hidden_size % 4 == 0,
                f"llm.hidden_size {llm.hidden_size} must be divisible by 4 (2-D sin-cos tables)",
            ),
            (
                not self.arch.interpolate_pos,
                "arch.interpolate_pos=True is not supported (the release uses extrapolate)",
            ),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(errors))


def _read_section(path: Path, cls: type, required: bool) -> Any:
    """Build dataclass `cls` from a JSON file, ignoring the official files' informational keys."""
    if not path.exists():
        if required:
            raise ConfigError(f"{path}: missing (a checkpoint directory needs it)")
        return cls()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            continue  # e.g. architectures, model_type, rope_scaling: fixed for this model family
        default = getattr(cls(), key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{path}: field {key!r}: expected bool, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: field {key!r}: expected number, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _bagel_7b_mot() -> BagelConfig:
    # ByteDance-Seed/BAGEL-7B-MoT: llm_config.json + app.py (qk_norm, untied, MoT); vit_config.json
    # (27 layers in the file, 26 built); FLUX.1 AE of load_ae; BagelConfig of app.py.
    return BagelConfig()


def _tiny() -> BagelConfig:
    # shared/reference/tiny: byte tokenizer (ids 0..255 + specials 300..), 2-layer MoT, 2-layer ViT, 2x VAE.
    return BagelConfig(
        llm=LLMConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=112),
        vae=VAEConfig(downsample=2, ch=32, ch_mult=[1, 2], num_res_blocks=1),
        arch=BagelArchConfig(max_latent_size=8, vit_max_num_patch_per_side=8),
    )


PRESETS = {"bagel-7b-mot": _bagel_7b_mot, "tiny": _tiny}
