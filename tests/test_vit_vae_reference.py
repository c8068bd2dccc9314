"""SigLIP encoder and FLUX AutoEncoder vs the official reference (shared/reference/tiny), plus the 7B key/shape
tables of shared/reference/bagel_7b_mot_param_shapes.json (built on the meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.config import BagelConfig
from bagel_ft.siglip import SiglipVisionModel

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
TINY = REF / "tiny"
# only the tests that read the reference skip without it; pure-function tests always run
needs_ref = pytest.mark.skipif(not TINY.is_dir(), reason=f"reference data not found at {TINY}")
TOL = 1e-4


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def outputs():
    return load_file(TINY / "outputs.safetensors")


@pytest.fixture(scope="module")
def inputs():
    return load_file(TINY / "inputs.safetensors")


@pytest.fixture(scope="module")
def vit() -> SiglipVisionModel:
    cfg = BagelConfig.from_dir(TINY).vit
    assert cfg.num_layers_built == 2  # vit_config.json says 3; the official loader builds 3 - 1
    model = SiglipVisionModel(cfg).eval()
    ema = load_file(TINY / "ema.safetensors")
    state = {k.removeprefix("vit_model."): v for k, v in ema.items() if k.startswith("vit_model.")}
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def vae() -> AutoEncoder:
    cfg = BagelConfig.from_dir(TINY).vae
    model = AutoEncoder(cfg).eval()
    model.load_state_dict(load_file(TINY / "ae.safetensors"), strict=True)
    return model


# ---- ViT ----------------------------------------------------------------------------------------------


@needs_ref
def test_vit_post_layernorm(vit, inputs, outputs):
    seqlens = inputs["vit_token_seqlens"]
    cu = torch.nn.functional.pad(torch.cumsum(seqlens, 0), (1, 0)).to(torch.int32)
    with torch.no_grad():
        out = vit(inputs["packed_vit_tokens"], inputs["packed_vit_position_ids"], cu, int(seqlens.max()))
    assert _max_abs(out, outputs["vit_post_layernorm"]) <= TOL


@needs_ref
def test_vit_images_do_not_see_each_other(vit, inputs):
    # Packing a second image after the first must not change the first image's features.
    tokens, ids = inputs["packed_vit_tokens"], inputs["packed_vit_position_ids"]
    other = torch.randn(6, tokens.shape[1], generator=torch.Generator().manual_seed(0))
    other_ids = torch.arange(6)
    with torch.no_grad():
        alone = vit(tokens, ids, torch.tensor([0, 12], dtype=torch.int32), 12)
        packed = vit(
            torch.cat([tokens, other]), torch.cat([ids, other_ids]), torch.tensor([0, 12, 18], dtype=torch.int32), 12
        )
        second = vit(other, other_ids, torch.tensor([0, 6], dtype=torch.int32), 6)
    assert _max_abs(packed[:12], alone) <= 1e-5
    assert _max_abs(packed[12:], second) <= 1e-5
    # and attention is not restricted within an image: changing one patch changes the others' features
    poked = tokens.clone()
    poked[0] += 1.0
    with torch.no_grad():
        moved = vit(poked, ids, torch.tensor([0, 12], dtype=torch.int32), 12)
    assert (moved[1:] - alone[1:]).abs().max() > 1e-3


# ---- VAE ----------------------------------------------------------------------------------------------


@needs_ref
def test_vae_encode_decode_padded_batch(vae, inputs, outputs):
    with torch.no_grad():
        mean_raw = torch.chunk(vae.encoder(inputs["padded_images"]), 2, dim=1)[0]
        scaled = vae.encode(inputs["padded_images"])
        decoded = vae.decode(inputs["padded_latent"])
    assert _max_abs(mean_raw, outputs["vae_encode_mean_raw"]) <= TOL
    assert _max_abs(scaled, outputs["vae_encode_mean_scaled"]) <= TOL
    assert _max_abs(decoded, outputs["vae_decode_of_mean_scaled"]) <= TOL
    assert vae.scale_factor == pytest.approx(outputs["vae_scale_factor"].item())
    assert vae.shift_factor == pytest.approx(outputs["vae_shift_factor"].item())


@needs_ref
@pytest.mark.parametrize("name", ["vae_cond", "vae_target", "t2i"])
def test_vae_per_image(vae, inputs, outputs, name):
    image = inputs[f"image_img_{name}"][None]
    with torch.no_grad():
        latent = vae.encode(image)
        decoded = vae.decode(latent)
    assert _max_abs(latent, outputs[f"vae_encode_img_{name}"]) <= TOL
    assert _max_abs(decoded, outputs[f"vae_decode_img_{name}"]) <= TOL


@needs_ref
def test_vae_sampling_uses_generator(vae, inputs):
    image = inputs["image_img_t2i"][None]
    with torch.no_grad():
        mean = vae.encode(image)
        a = vae.encode(image, sample=True, generator=torch.Generator().manual_seed(3))
        b = vae.encode(image, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a - mean).abs().max() > 1e-4


# ---- 7B keys and shapes on the meta device --------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_7b() -> dict:
    return json.loads((REF / "bagel_7b_mot_param_shapes.json").read_text())


@needs_ref
def test_7b_vit_keys_and_shapes(shapes_7b):
    cfg = BagelConfig.preset("bagel-7b-mot")
    with torch.device("meta"):
        model = SiglipVisionModel(cfg.vit)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k.removeprefix("vit_model."): v for k, v in shapes_7b["params"].items() if k.startswith("vit_model.")}
    assert list(ours) == list(official)  # same keys, same order
    assert ours == official
    assert all(p.is_meta for p in model.parameters())


@needs_ref
def test_7b_autoencoder_keys_and_shapes(shapes_7b):
    cfg = BagelConfig.preset("bagel-7b-mot")
    with torch.device("meta"):
        model = AutoEncoder(cfg.vae)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(shapes_7b["ae_params"])
    assert ours == shapes_7b["ae_params"]
    assert sum(p.numel() for p in model.parameters()) == shapes_7b["ae_total_params"]
    assert all(p.is_meta for p in model.parameters())
