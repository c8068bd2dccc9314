"""Checkpoint directories: strict loading with one error naming every problem, atomic saving, bit-exact
round trips, and the optional sin-cos tables."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import bagel_ft.checkpoint as ckpt
from bagel_ft.checkpoint import CheckpointError
from bagel_ft.embeddings import sincos_2d_table
from bagel_ft.modeling import Bagel


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path):
    """A writable copy of the tiny reference checkpoint."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in (
        "llm_config.json",
        "vit_config.json",
        "vae_config.json",
        "bagel_config.json",
        "ema.safetensors",
        "ae.safetensors",
    ):
        shutil.copy(tiny_dir / name, out / name)
    return out


def _rewrite(file, edit):
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file))


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tiny_dir, tmp_path, dtype):
    model = Bagel.from_pretrained(tiny_dir, dtype=dtype)
    model.save_pretrained(tmp_path / "out")
    again = Bagel.from_pretrained(tmp_path / "out", dtype=dtype)
    _assert_same(model.state_dict(), again.state_dict())
    _assert_same(model.vae.state_dict(), again.vae.state_dict())
    assert again.config == model.config
    # the file layout of the release: Bagel state incl. the sin-cos tables, AE separate
    saved = load_file(str(tmp_path / "out" / "ema.safetensors"))
    assert "latent_pos_embed.pos_embed" in saved and not any(k.startswith("encoder.") for k in saved)
    if dtype == torch.float32:  # and it equals the reference file exactly
        _assert_same(dict(sorted(saved.items())), dict(sorted(load_file(str(tiny_dir / "ema.safetensors")).items())))


def test_saving_replaces_atomically_and_keeps_other_files(tiny_dir, tmp_path, monkeypatch):
    model = Bagel.from_pretrained(tiny_dir)
    out = tmp_path / "out"
    model.save_pretrained(out)
    (out / "tokenizer_config.json").write_text("{}")
    before = (out / "ema.safetensors").read_bytes()
    with torch.no_grad():
        model.llm2vae.bias.add_(1.0)

    real_write = ckpt._write_state

    def crash_on_ae(state, directory, stem, *args):
        if stem == "ae":
            raise OSError("disk full")
        real_write(state, directory, stem, *args)

    monkeypatch.setattr(ckpt, "_write_state", crash_on_ae)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out)
    assert (out / "ema.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    monkeypatch.undo()

    model.save_pretrained(out)
    again = Bagel.from_pretrained(out)
    assert torch.equal(again.llm2vae.bias, model.llm2vae.bias)
    assert (out / "tokenizer_config.json").read_text() == "{}"


def test_sincos_tables_optional_and_checked(tiny_copy):
    _rewrite(
        tiny_copy / "ema.safetensors", lambda s: [s.pop("latent_pos_embed.pos_embed"), s.pop("vit_pos_embed.pos_embed")]
    )
    model = Bagel.from_pretrained(tiny_copy)
    assert torch.equal(model.latent_pos_embed.pos_embed, sincos_2d_table(64, 8))
    assert not model.vit_pos_embed.pos_embed.requires_grad

    def corrupt(s):
        s["vit_pos_embed.pos_embed"] = torch.zeros(64, 64)

    _rewrite(tiny_copy / "ema.safetensors", corrupt)
    with pytest.raises(CheckpointError, match="vit_pos_embed.pos_embed is not the 2-D sin-cos table"):
        Bagel.from_pretrained(tiny_copy)


def test_every_key_problem_is_reported_at_once(tiny_copy):
    def edit(s):
        s.pop("language_model.model.layers.1.self_attn.q_norm_moe_gen.weight")
        s["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        s["vae2llm.weight"] = torch.zeros(64, 65)

    _rewrite(tiny_copy / "ema.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        Bagel.from_pretrained(tiny_copy)
    msg = str(err.value)
    assert "ema.safetensors" in msg and "3 problems" in msg
    assert "missing key language_model.model.layers.1.self_attn.q_norm_moe_gen.weight (expected shape [16])" in msg
    assert "unexpected key language_model.model.layers.9.mlp.up_proj.weight (shape [2, 2])" in msg
    assert "shape mismatch vae2llm.weight: expected [64, 64], got [64, 65]" in msg


def test_autoencoder_is_loaded_strictly(tiny_copy):
    _rewrite(tiny_copy / "ae.safetensors", lambda s: s.pop("decoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"ae\.safetensors.*\n.*missing key decoder\.conv_out\.bias"):
        Bagel.from_pretrained(tiny_copy)
    assert Bagel.from_pretrained(tiny_copy, load_vae=False).vae is None
    (tiny_copy / "ae.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ae\.safetensors: missing"):
        Bagel.from_pretrained(tiny_copy)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
@pytest.mark.parametrize("name", ["ema.safetensors", "ae.safetensors"])
def test_corrupt_files_name_the_file(tiny_copy, damage, name):
    file = tiny_copy / name
    data = file.read_bytes()
    file.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage_header": b"\xff" * 64 + data[64:], "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match=rf"{name}: cannot read safetensors file"):
        Bagel.from_pretrained(tiny_copy)


def test_model_safetensors_is_accepted_and_configs_are_required(tiny_copy):
    (tiny_copy / "ema.safetensors").rename(tiny_copy / "model.safetensors")
    Bagel.from_pretrained(tiny_copy)
    (tiny_copy / "llm_config.json").unlink()
    with pytest.raises(ValueError, match="llm_config.json: missing"):
        Bagel.from_pretrained(tiny_copy)


def test_loading_keeps_frozen_tables_and_rope_in_float32(tiny_dir):
    model = Bagel.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert model.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    rope = model.language_model.model.rotary_emb.inv_freq
    assert rope.dtype == torch.float32 and rope[0].item() == 1.0
    assert not any(t.is_meta for t in model.state_dict().values())
    assert not model.latent_pos_embed.pos_embed.requires_grad and model.llm2vae.weight.requires_grad


def test_model_cli_builds_saves_reloads_and_runs(tmp_path, capsys):
    from bagel_ft.cli import main

    assert main(["model", "--out", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    printed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert {"checkpoint", "parameters", "sequence", "ce", "mse", "time"} <= set(printed)
    ce = float(printed["ce"].split()[1])
    assert abs(ce - torch.log(torch.tensor(320.0)).item()) < 0.3  # N(0, 0.02) init: near-uniform logits
    model = Bagel.from_pretrained(tmp_path / "tiny")
    assert torch.count_nonzero(model.llm2vae.weight) == 0  # official zero init
    attn = model.language_model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, attn.q_proj_moe_gen.weight)  # gen twins start as copies (init_moe)
    assert abs(attn.q_proj.weight.std().item() - 0.02) < 0.005
