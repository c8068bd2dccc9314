"""Shared fixtures: the official reference data (../shared/reference, always present in CI) as tensors,
a `PackedBatch` of the reference's training inputs, and the tiny reference model loaded strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from bagel_ft.attention import ATTN_MODES
from bagel_ft.batch import PackedBatch

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_dir(reference_dir) -> Path:
    return reference_dir / "tiny"


@pytest.fixture(scope="session")
def ref_inputs(tiny_dir) -> dict:
    return load_file(str(tiny_dir / "inputs.safetensors"))


@pytest.fixture(scope="session")
def ref_outputs(tiny_dir) -> dict:
    return load_file(str(tiny_dir / "outputs.safetensors"))


def batch_from_reference(d: dict) -> PackedBatch:
    """The reference's packed inputs (official field names) as a PackedBatch; attn_modes_code 0/1/2 =
    causal/full/noise. The reference's `nested_attention_mask_*` are not an input: we build masks ourselves."""
    batch = PackedBatch(
        sequence_length=int(d["sample_lens"].sum()),
        sample_lens=d["sample_lens"].tolist(),
        packed_position_ids=d["packed_position_ids"],
        split_lens=d["split_lens"].tolist(),
        attn_modes=[ATTN_MODES[c] for c in d["attn_modes_code"].tolist()],
        packed_text_ids=d["packed_text_ids"],
        packed_text_indexes=d["packed_text_indexes"],
        packed_label_ids=d["packed_label_ids"],
        ce_loss_indexes=d["ce_loss_indexes"],
        ce_loss_weights=d["ce_loss_weights"],
        packed_vit_tokens=d["packed_vit_tokens"],
        packed_vit_position_ids=d["packed_vit_position_ids"],
        packed_vit_token_indexes=d["packed_vit_token_indexes"],
        vit_token_seqlens=d["vit_token_seqlens"],
        padded_images=d["padded_images"],
        padded_latent=d["padded_latent"],
        patchified_vae_latent_shapes=[tuple(hw) for hw in d["patchified_vae_latent_shapes"].tolist()],
        packed_latent_position_ids=d["packed_latent_position_ids"],
        packed_vae_token_indexes=d["packed_vae_token_indexes"],
        packed_timesteps=d["packed_timesteps"],
        mse_loss_indexes=d["mse_loss_indexes"],
        noise=d["noise"],
    )
    batch.validate()
    return batch


@pytest.fixture
def ref_batch(ref_inputs) -> PackedBatch:
    return batch_from_reference(ref_inputs)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The tiny reference Bagel (+ autoencoder), strictly loaded, eval mode. Do not modify it in a test."""
    from bagel_ft.modeling import Bagel

    return Bagel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny-model ops are dominated by thread synchronisation on a shared CPU: 1 thread is ~10x faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    """An inference Engine over the tiny reference model and the byte tokenizer."""
    from bagel_ft.tokenizer import ByteTokenizer
    from inference.engine import Engine

    return Engine(tiny_model, ByteTokenizer())
