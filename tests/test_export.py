"""Drop-in exports, from a miniature of the release directory (tests/release_dir.py) fine-tuned a few steps:

* the weights are the run's EMA in the release's dtype (bf16), every other file of the release is byte-identical
  (tokenizer files, configs written by another tool, README, folders), a manifest says what the fine-tune was;
* the directory loads where users load the release: `Bagel.from_pretrained`, the official app's loader
  (accelerate's `load_checkpoint_and_dispatch` on `ema.safetensors`, strict), the official app's slow
  `Qwen2Tokenizer` from vocab.json / merges.txt, and our `load_tokenizer`;
* a config value the fine-tune changed is rewritten in that key only; `export.dtype` / `export.max_shard_gb` give
  float32 and shards with an index, which both loaders read too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from release_dir import TEXTS, make_release_dir
from safetensors import safe_open

from bagel_ft.config import BagelConfig
from bagel_ft.modeling import Bagel
from bagel_ft.tokenizer import load_tokenizer
from training import checkpoint as ckpt
from training.config import load_config
from training.export import MANIFEST, export_ema
from training.synthetic import write_table
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny_cpu.yaml"
STEPS = 3


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_release_dir(tmp_path_factory.mktemp("release") / "BAGEL-mini")


@pytest.fixture(scope="module")
def finetuned(release, tmp_path_factory):
    """(run dir, overrides, data dir): STEPS steps from the release, exported at the end to run/export."""
    data = write_table(tmp_path_factory.mktemp("data") / "synthetic", records=12, size=(16, 16), rows_per_file=12)
    run = tmp_path_factory.mktemp("run")
    overrides = [
        "model.init=pretrained",
        f"model.path={release}",
        "model.tokenizer=",  # the release's own tokenizer
        f"data.sources=[{{path: {data}}}]",
        f"run.dir={run}",
        f"train.steps={STEPS}",
        f"train.save_every={STEPS}",
        "optim.ema_decay=0.5",
        "optim.warmup_steps=1",
        "data.prefetch=0",
    ]
    Trainer(load_config(TINY, overrides)).setup().train()
    return run, overrides, data


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ema(run: Path) -> dict[str, torch.Tensor]:
    """The run's final EMA (float32) from its last training checkpoint."""
    last = ckpt.latest_checkpoint(run / "checkpoints")
    keys = json.loads((last / "meta.json").read_text())["ema_keys"]
    with torch.device("meta"):
        shapes = Bagel(BagelConfig.preset("tiny")).state_dict()
    ema = {k: torch.empty(shapes[k].shape) for k in keys}
    dcp.load({"ema": ema}, checkpoint_id=str(last), no_dist=True)
    return ema


def _header_dtypes(file: Path) -> set[str]:
    with safe_open(str(file), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def _official_app_load(export: Path, checkpoint: str) -> Bagel:
    """What the official app does with the directory: an empty-weights model, then accelerate's loader on the
    weights file with dtype bf16 (strict here: a missing or unexpected key fails)."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = Bagel(BagelConfig.from_dir(export))
    return load_checkpoint_and_dispatch(
        model, checkpoint=str(export / checkpoint), device_map={"": "cpu"}, dtype=torch.bfloat16, strict=True
    )


def test_export_is_a_drop_in_replacement_of_the_release(release, finetuned, tmp_path):
    run, _, data = finetuned
    export = run / "export"
    src, out = _files(release), _files(export)

    # every file of the release but its weights, byte-identical; ours added: the manifest and the image bounds
    # the run trained with (tiny_cpu.yaml's, not the release's defaults)
    assert set(out) == set(src) | {MANIFEST, "image_geometry.json"}
    for name, content in src.items():
        if name != "ema.safetensors":
            assert out[name] == content, f"{name} differs from the release"

    # the weights: the EMA, in the release's dtype
    assert _header_dtypes(export / "ema.safetensors") == {"BF16"}
    model = Bagel.from_pretrained(export, dtype=torch.bfloat16)  # strict
    state = model.state_dict()
    ema = _ema(run)
    assert ema and all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in ema.items())
    trained = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[trained], Bagel.from_pretrained(release, dtype=torch.bfloat16).state_dict()[trained])

    # the official app's loader reads it to the same values
    official = _official_app_load(export, "ema.safetensors").state_dict()
    assert set(official) == set(state)
    assert all(torch.equal(official[k], state[k]) for k in state)

    # the official app's slow tokenizer needs just vocab.json + merges.txt (+ tokenizer_config.json)
    from transformers import Qwen2Tokenizer

    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(export / name, slow / name)
    official_tok, ours = Qwen2Tokenizer.from_pretrained(str(slow)), load_tokenizer(export)
    reference = load_tokenizer(release)
    for text in TEXTS:
        assert official_tok.encode(text) == ours.encode(text) == reference.encode(text)
    assert ours.vision_start_id == reference.vision_start_id

    manifest = json.loads((export / MANIFEST).read_text())
    assert manifest["base"]["path"] == str(release.resolve()) and manifest["steps"] == STEPS
    assert manifest["weights"] == {"source": "ema", "dtype": "bfloat16", "lora_merged": False}
    assert manifest["data"] == [{"path": str(data), "weight": 1.0, "subsets": []}]
    assert manifest["config"]["optim"]["ema_decay"] == 0.5


def test_changed_config_keys_shards_and_dtype_override(release, finetuned):
    run, overrides, _ = finetuned
    cfg = load_config(TINY, overrides + ["model.timestep_shift=2.5", "export.dtype=fp32", "export.max_shard_gb=0.0002"])
    export = export_ema(cfg, ckpt.latest_checkpoint(run / "checkpoints"), run / "export-sharded")

    # bagel_config.json: only timestep_shift changed; the other configs stay byte-identical
    before, after = (
        json.loads((release / "bagel_config.json").read_text()),
        json.loads((export / "bagel_config.json").read_text()),
    )
    assert after == {**before, "timestep_shift": 2.5}
    for name in ("llm_config.json", "vit_config.json", "vae_config.json", "config.json"):
        assert (export / name).read_bytes() == (release / name).read_bytes(), name

    # float32 shards + index (200 kB each), no single file; both loaders read them
    index = json.loads((export / "ema.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (export / "ema.safetensors").exists()
    assert all(_header_dtypes(export / s) == {"F32"} for s in shards)
    model = Bagel.from_pretrained(export)
    assert model.config.arch.timestep_shift == 2.5
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in _ema(run).items())  # the float32 EMA exactly
    official = _official_app_load(export, "ema.safetensors.index.json").state_dict()
    assert all(torch.equal(official[k], state[k].to(torch.bfloat16)) for k in state)

    # exporting over it again replaces it; an unrelated directory is refused
    export_ema(cfg, ckpt.latest_checkpoint(run / "checkpoints"), export)
    (run / "not-an-export").mkdir()
    (run / "not-an-export" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an exported model"):
        export_ema(cfg, ckpt.latest_checkpoint(run / "checkpoints"), run / "not-an-export")
