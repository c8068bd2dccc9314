"""bagel_ft.embeddings vs the official reference (shared/reference/tiny): sin-cos tables, timestep embeddings,
latent position embeddings, patchify layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_ft.config import BagelConfig
from bagel_ft.embeddings import (
    MLPconnector,
    PositionEmbedding,
    TimestepEmbedder,
    latent_position_ids,
    patchify_latent,
    sincos_2d_table,
    unpatchify_latent,
)
from bagel_ft.flow import training_timesteps
from bagel_ft.siglip import patchify_image, vit_position_ids

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
TINY = REF / "tiny"
# only the tests that read the reference skip without it; pure-function tests always run
needs_ref = pytest.mark.skipif(not TINY.is_dir(), reason=f"reference data not found at {TINY}")
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return {
        "ema": load_file(TINY / "ema.safetensors"),
        "inputs": load_file(TINY / "inputs.safetensors"),
        "outputs": load_file(TINY / "outputs.safetensors"),
    }


def _submodule_state(ema: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)}


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@needs_ref
def test_sincos_tables_equal_saved(ref):
    cfg = BagelConfig.preset("tiny")
    for name, side in [
        ("latent_pos_embed", cfg.arch.max_latent_size),
        ("vit_pos_embed", cfg.arch.vit_max_num_patch_per_side),
    ]:
        emb = PositionEmbedding(side, cfg.llm.hidden_size)
        saved = ref["ema"][f"{name}.pos_embed"]
        assert not emb.pos_embed.requires_grad
        assert _max_abs(emb.pos_embed, saved) <= 1e-6, name


def test_sincos_layout_column_first_then_row():
    # id = row*side + col; first H/2 dims depend on the column only, last H/2 on the row only.
    table = sincos_2d_table(8, 4)
    r, c = 2, 3
    row_only = sincos_2d_table(8, 4)[r * 4 + 0]
    col_only = sincos_2d_table(8, 4)[0 * 4 + c]
    assert torch.equal(table[r * 4 + c, :4], col_only[:4])
    assert torch.equal(table[r * 4 + c, 4:], row_only[4:])
    # each half = [sin(pos w_k)] ++ [cos(pos w_k)], w_0 = 1
    assert table[c, 0].item() == pytest.approx(torch.sin(torch.tensor(float(c))).item(), abs=1e-6)
    assert table[c, 2].item() == pytest.approx(torch.cos(torch.tensor(float(c))).item(), abs=1e-6)


def test_position_embedding_meta_then_reset():
    with torch.device("meta"):
        emb = PositionEmbedding(8, 64)
    assert emb.pos_embed.is_meta
    emb.to_empty(device="cpu")
    emb.reset_parameters()
    assert torch.equal(emb.pos_embed, sincos_2d_table(64, 8))
    assert not emb.pos_embed.requires_grad


@needs_ref
def test_latent_pos_embeds(ref):
    emb = PositionEmbedding(8, 64)
    ids = ref["inputs"]["packed_latent_position_ids"]
    err = _max_abs(emb(ids), ref["outputs"]["latent_pos_embeds"])
    assert err <= TOL


@needs_ref
def test_latent_position_ids_match_packing(ref):
    shapes = ref["inputs"]["patchified_vae_latent_shapes"].tolist()
    ids = torch.cat([latent_position_ids(h, w, 8) for h, w in shapes])
    assert torch.equal(ids, ref["inputs"]["packed_latent_position_ids"])
    with pytest.raises(ValueError):
        latent_position_ids(9, 1, 8)


@needs_ref
@pytest.mark.parametrize("prefix", ["", "shift3_"])
def test_time_embeds(ref, prefix):
    embedder = TimestepEmbedder(64)
    embedder.load_state_dict(_submodule_state(ref["ema"], "time_embedder."), strict=True)
    shift = 3.0 if prefix else 1.0
    t = training_timesteps(ref["inputs"]["packed_timesteps"], shift)
    assert _max_abs(t, ref["outputs"][f"{prefix}timesteps_after_sigmoid_shift"]) <= 1e-6
    if not prefix:  # time_embeds is stored for the shift-1 forward only
        err = _max_abs(embedder(t), ref["outputs"]["time_embeds"])
        assert err <= TOL


@needs_ref
def test_vit_connector_and_pos_embeds(ref):
    conn = MLPconnector(32, 64, "gelu_pytorch_tanh")
    conn.load_state_dict(_submodule_state(ref["ema"], "connector."), strict=True)
    vit_pos = PositionEmbedding(8, 64)
    out = ref["outputs"]
    connector_out = conn(out["vit_post_layernorm"])
    pos = vit_pos(ref["inputs"]["packed_vit_position_ids"])
    assert _max_abs(connector_out, out["vit_connector_out"]) <= TOL
    assert _max_abs(pos, out["vit_pos_embeds"]) <= TOL
    assert _max_abs(connector_out + pos, out["vit_embeds_with_pos"]) <= TOL


@needs_ref
def test_patchify_latent_matches_packed_latent(ref):
    inputs = ref["inputs"]
    p = 2
    tokens = [
        patchify_latent(lat[:, : h * p, : w * p], p)
        for lat, (h, w) in zip(inputs["padded_latent"], inputs["patchified_vae_latent_shapes"].tolist(), strict=True)
    ]
    assert torch.equal(torch.cat(tokens), inputs["packed_latent_clean"])
    # unpatchify is the exact inverse
    h, w = inputs["patchified_vae_latent_shapes"][0].tolist()
    lat = inputs["padded_latent"][0, :, : h * p, : w * p]
    assert torch.equal(unpatchify_latent(patchify_latent(lat, p), h, w, p, 16), lat)


def test_patchify_latent_feature_order():
    # one 2x2 patch of a 3-channel latent: features (p, q, c), channel fastest
    lat = torch.arange(12.0).reshape(3, 2, 2)  # value = c*4 + p*2 + q
    assert patchify_latent(lat, 2)[0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


@needs_ref
def test_patchify_image_and_vit_ids_match_packing(ref):
    image = ref["inputs"]["image_img_vit"]  # 42 x 56 px -> 3 x 4 patches of 14
    assert torch.equal(patchify_image(image, 14), ref["inputs"]["packed_vit_tokens"])
    assert torch.equal(vit_position_ids(3, 4, 8), ref["inputs"]["packed_vit_position_ids"])


@needs_ref
@pytest.mark.parametrize("scenario,hw", [("A", (5, 4)), ("B", (4, 6))])
def test_unpatchify_matches_official_decode_reshape(scenario, hw):
    inf = load_file(TINY / "inference_outputs.safetensors")
    latent = unpatchify_latent(inf[f"{scenario}.euler_final_latent"], *hw, p=2, z=16)
    assert torch.equal(latent[None], inf[f"{scenario}.euler_final_latent_unpatchified"])
