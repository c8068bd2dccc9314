"""Loading the model to train (training.loading) in one process: FSDP + pretrained builds a meta skeleton that
is checked against the file headers before any data is read, then filled after sharding (LoRA adapters and
sin-cos tables included) to exactly what `Bagel.from_pretrained` loads. Two ranks reading their halves:
tests/test_training_distributed.py (slow)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.checkpoint import CheckpointError
from bagel_ft.config import BagelConfig
from bagel_ft.modeling import Bagel
from training.config import load_config
from training.loading import build_model, local_view
from training.lora import initial_adapter_weight
from training.optim import clean_name
from training.parallelize import DistEnv, prepare_model

CPU = torch.device("cpu")


@pytest.fixture
def bf16_dir(tmp_path):
    torch.manual_seed(0)
    cfg = BagelConfig.preset("tiny")
    Bagel(cfg).attach_vae(AutoEncoder(cfg.vae)).save_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    return tmp_path / "ckpt"


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield DistEnv(0, 1, 0, CPU)
    dist.destroy_process_group()


def _cfg(path, *extra):
    return load_config(
        "configs/train/tiny_cpu.yaml",
        ["model.init=pretrained", f"model.path={path}", "data.sources=[{path: unused}]", *extra],
    )


def test_fsdp_skeleton_is_filled_with_the_checkpoint(bf16_dir, one_rank_group):
    cfg = _cfg(
        bf16_dir, "train.sharding=fsdp", "lora.enabled=true", "lora.rank=4", "train.activation_checkpointing=true"
    )
    skeleton = build_model(cfg, CPU)
    assert all(p.is_meta for p in skeleton.parameters()) and not skeleton.vae.encoder.conv_in.weight.is_meta
    model = prepare_model(skeleton, cfg, one_rank_group)
    reference = Bagel.from_pretrained(bf16_dir)
    expected = reference.state_dict()
    seen = set()
    for name, p in model.named_parameters():
        key, (local, index) = clean_name(name), local_view(p)
        assert index == (slice(0, p.shape[0]),) and local.dtype == torch.float32  # one rank: all rows
        if ".lora_" in key:
            assert torch.equal(local, initial_adapter_weight(key, tuple(p.shape), cfg.run.seed))
            assert (local.abs().sum() > 0) == (".lora_A." in key)
        else:
            assert torch.equal(local, expected[key]), key
            seen.add(key)
    assert seen == set(expected)
    assert torch.equal(model.vae.decoder.conv_out.weight, reference.vae.decoder.conv_out.weight)
    rope = model.language_model.model.rotary_emb.inv_freq
    assert torch.equal(rope, reference.language_model.model.rotary_emb.inv_freq)


def test_skeleton_is_checked_before_any_data_is_read(bf16_dir):
    file = bf16_dir / "ema.safetensors"
    state = load_file(str(file))
    state.pop("llm2vae.bias")
    state["vae2llm.weight"] = torch.zeros(64, 65)
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match="2 problems") as err:
        build_model(_cfg(bf16_dir, "train.sharding=fsdp"), CPU)
    assert "missing key llm2vae.bias" in str(err.value) and "shape mismatch vae2llm.weight" in str(err.value)


def test_without_sin_cos_tables_they_are_recomputed(bf16_dir, one_rank_group):
    file = bf16_dir / "ema.safetensors"
    state = load_file(str(file))
    del state["latent_pos_embed.pos_embed"], state["vit_pos_embed.pos_embed"]
    save_file(state, str(file))
    model = prepare_model(
        build_model(_cfg(bf16_dir, "train.sharding=fsdp"), CPU), _cfg(bf16_dir, "train.sharding=fsdp"), one_rank_group
    )
    reference = Bagel.from_pretrained(bf16_dir)
    for key in ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"):
        assert torch.equal(local_view(model.get_parameter(key))[0], reference.get_parameter(key)), key


def test_replicated_runs_load_straight_onto_the_device(bf16_dir):
    model = build_model(_cfg(bf16_dir, "train.sharding=none", "model.timestep_shift=3.0"), CPU)
    assert model.config.arch.timestep_shift == 3.0
    reference = Bagel.from_pretrained(bf16_dir).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
