"""Export a training checkpoint as a drop-in model directory: the source's files, the fine-tuned weights.

    bagel-ft train RUN/config.yaml --export RUN/checkpoints/step_00010000 OUT_DIR

OUT_DIR, for a run from a checkpoint directory (model.path, e.g. the BAGEL-7B-MoT release):
  * the Bagel weights: the EMA of the trained parameters (the weights themselves where the run kept no EMA),
    the frozen ones as loaded, LoRA adapters merged; in the source's dtype (bf16 for the release, so 29 GB,
    not 58; `export.dtype` overrides), as ema.safetensors, or as shards + ema.safetensors.index.json when
    `export.max_shard_gb` is set;
  * every other file of the source directory, byte-identical: ae.safetensors (the VAE is frozen), the
    tokenizer files (vocab.json / merges.txt for the official app's slow Qwen2Tokenizer, tokenizer.json,
    tokenizer_config.json: never re-saved, so no newer transformers writes fields an older one cannot parse),
    the configs, README, anything else;
  * the config files whose values the fine-tune changed, with just those keys rewritten (e.g. bagel_config.json
    after model.timestep_shift), and image_geometry.json when the run's image bounds differ from the source's
    (inference then resizes as training did);
  * finetune.json (`MANIFEST`): what the fine-tune was (base, checkpoint and step, data, the resolved config).
A model.init=random run has no source: its configs, its random-init VAE and its tokenizer are written instead.

Streaming: one process reads the checkpoint's shards tensor by tensor (torch.distributed.checkpoint loads only
the entries asked for), merges / casts, writes, and frees: no process ever holds the whole model. The
directory appears atomically (bagel_ft.checkpoint.replacing_directory).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader

from bagel_ft.checkpoint import AE_FILE, MODEL_STEMS, is_model_weight_file, model_weights, replacing_directory
from bagel_ft.config import BagelConfig
from bagel_ft.modeling import Bagel
from bagel_ft.transforms import ImageGeometry
from bagel_ft.weights import TensorSpec, write_weights
from training.config import Config, to_dict
from training.lora import LoRALinear, apply_lora, merged_weight

RANDOM_INIT_AE = "random_init_ae.safetensors"  # run.dir file: the VAE of a model.init=random run
MANIFEST = "finetune.json"
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
)


class CheckpointTensors:
    """Entries of a training checkpoint (torch.distributed.checkpoint) read one at a time in one process.

    `weight(key)` is what the export takes for a Bagel key: the EMA where the run kept one for it, else the
    model's value (frozen parameters, or a run without EMA)."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = _MetadataOnce(str(path))
        self.entries = self.reader.read_metadata().state_dict_metadata
        self.ema_keys = set(json.loads((path / "meta.json").read_text()).get("ema_keys", []))

    def read(self, entry: str) -> Tensor:
        """One tensor, e.g. "model.vae2llm.weight", assembled from every rank's shards of it."""
        if entry not in self.entries:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {entry!r}")
        md = self.entries[entry]
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        section, key = entry.split(".", 1)
        dcp.load({section: {key: out}}, storage_reader=self.reader, no_dist=True)
        return out

    def weight(self, key: str) -> Tensor:
        return self.read(f"ema.{key}" if key in self.ema_keys else f"model.{key}")


class _MetadataOnce(FileSystemReader):
    """A FileSystemReader that unpickles the checkpoint's .metadata once, not on every load."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def export_ema(cfg: Config, checkpoint: str | Path, out_dir: str | Path, tokenizer=None) -> Path:
    from training.loading import checkpoint_path, model_config
    from training.trainer import build_tokenizer, image_bounds

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if (checkpoint / "ds").is_dir():
        raise NotImplementedError(
            f"{checkpoint}: DeepSpeed checkpoints are exported with DeepSpeed's "
            "zero_to_fp32.py; EMA export supports FSDP / single-process checkpoints"
        )
    source = checkpoint_path(cfg) if cfg.model.init == "pretrained" else None
    mcfg = model_config(cfg)
    tensors = CheckpointTensors(checkpoint)
    dtype = export_dtype(cfg, source)
    if out_dir.exists():  # a previous export: ours to replace (never some other directory)
        if not (out_dir / MANIFEST).is_file() and not _has_weights(out_dir) and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir}: exists and is not an exported model; choose another export dir")
    with replacing_directory(out_dir) as tmp:
        specs, stream = exported_weights(cfg, mcfg, tensors, dtype)
        write_weights(tmp, MODEL_STEMS[0], specs, stream, int(cfg.export.max_shard_gb * 1e9))
        if source is not None:
            copy_source_files(source, tmp)
            write_changed_configs(source, mcfg, tmp)
            copy_or_save_tokenizer(cfg, tokenizer, tmp)
        else:
            mcfg.save_dir(tmp)
            if (Path(cfg.run.dir) / RANDOM_INIT_AE).is_file():
                shutil.copy2(Path(cfg.run.dir) / RANDOM_INIT_AE, tmp / AE_FILE)
            (tokenizer or build_tokenizer(cfg)).save_pretrained(tmp)
        bounds = image_bounds(cfg)
        if source is None or bounds != ImageGeometry.from_dir(source):
            bounds.save_dir(tmp)  # inference resizes images exactly as training did
        write_manifest(cfg, checkpoint, source, dtype, tmp)
    return out_dir


def _has_weights(path: Path) -> bool:
    return any(is_model_weight_file(p.name) for p in path.iterdir())


def export_dtype(cfg: Config, source: Path | None) -> torch.dtype:
    """export.dtype, or the source checkpoint's dtype ('auto'; float32 without a source)."""
    if cfg.export.dtype != "auto":
        return EXPORT_DTYPES[cfg.export.dtype]
    return model_weights(source).dtype() if source is not None else torch.float32


def exported_weights(
    cfg: Config, mcfg: BagelConfig, tensors: CheckpointTensors, dtype: torch.dtype
) -> tuple[list[TensorSpec], Iterator[tuple[str, Tensor]]]:
    """The Bagel state dict to write, in the official key order: its specs, and a stream of its tensors."""
    with torch.device("meta"):
        model = Bagel(mcfg)
        layout = Bagel(mcfg)  # the training layout (LoRA adapters), whose names the checkpoint uses
        if cfg.lora.enabled:
            apply_lora(layout, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
    adapted = {f"{name}.weight": m for name, m in layout.named_modules() if isinstance(m, LoRALinear)}
    state = model.state_dict()

    def cast(t: Tensor) -> torch.dtype:
        return dtype if t.is_floating_point() else t.dtype

    specs = [TensorSpec(key, tuple(t.shape), cast(t)) for key, t in state.items()]

    def stream() -> Iterator[tuple[str, Tensor]]:
        for key, t in state.items():
            value = tensors.weight(key)
            if key in adapted:
                prefix = key.removesuffix(".weight")
                a, b = tensors.weight(f"{prefix}.lora_A.weight"), tensors.weight(f"{prefix}.lora_B.weight")
                value = merged_weight(value.float(), a.float(), b.float(), adapted[key].scale)
            yield key, value.to(cast(t))

    return specs, stream()


def copy_source_files(source: Path, out: Path) -> None:
    """Every file and folder of the source checkpoint byte-identical, except its Bagel weights (replaced)."""
    for item in sorted(source.iterdir()):
        if is_model_weight_file(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)  # follows symlinks (e.g. a Hugging Face cache snapshot)


def write_changed_configs(source: Path, mcfg: BagelConfig, out: Path) -> None:
    """Rewrite a config file only where the fine-tune changed a value of it, and only those keys."""
    before, after = BagelConfig.from_dir(source).files(), mcfg.files()
    for name, values in after.items():
        changed = {k: v for k, v in values.items() if before[name].get(k) != v}
        if not changed:
            continue  # the copied file stays byte-identical
        data = json.loads((source / name).read_text()) if (source / name).is_file() else dict(values)
        data.update(changed)
        (out / name).write_text(json.dumps(data, indent=2) + "\n")


def copy_or_save_tokenizer(cfg: Config, tokenizer, out: Path) -> None:
    """The source's own tokenizer files were copied; a tokenizer from elsewhere (model.tokenizer) replaces them:
    its files copied byte-identical when it is a directory, else written by the tokenizer."""
    name = cfg.model.tokenizer
    if not name or Path(name).resolve() == Path(cfg.model.path).resolve():
        return
    if Path(name).is_dir():
        for file in TOKENIZER_FILES:
            if (Path(name) / file).is_file():
                shutil.copy2(Path(name) / file, out / file)
        return
    from training.trainer import build_tokenizer

    (tokenizer or build_tokenizer(cfg)).save_pretrained(out)


def write_manifest(cfg: Config, checkpoint: Path, source: Path | None, dtype: torch.dtype, out: Path) -> None:
    meta = json.loads((checkpoint / "meta.json").read_text())
    base = {"path": str(source.resolve()) if source else None, "init": cfg.model.init}
    if source is not None and (source / MANIFEST).is_file():  # fine-tuning a fine-tune: keep the chain
        base["finetune"] = json.loads((source / MANIFEST).read_text())
    manifest = {
        "base": base,
        "checkpoint": str(checkpoint.resolve()),
        "steps": meta["step"],
        "world_size": meta.get("world_size"),
        "weights": {
            "source": "ema" if meta.get("ema_keys") else "model",
            "dtype": str(dtype).removeprefix("torch."),
            "lora_merged": cfg.lora.enabled,
        },
        "data": [dataclasses.asdict(s) for s in cfg.data.sources],
        "config": to_dict(cfg),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
