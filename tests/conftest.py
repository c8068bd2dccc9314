"""Shared fixtures: the official reference data (../shared/reference, always present in CI) as tensors,
a `PackedBatch` of the reference's training inputs, and the tiny reference model loaded strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

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


@pytest.fixture
def ref_batch(ref_inputs) -> PackedBatch:
    return PackedBatch.from_reference(ref_inputs)


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


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny Bagel (+ autoencoder, byte tokenizer) saved as a checkpoint directory."""
    import torch

    from bagel_ft.autoencoder import AutoEncoder
    from bagel_ft.config import BagelConfig
    from bagel_ft.modeling import Bagel
    from bagel_ft.tokenizer import ByteTokenizer

    torch.manual_seed(seed)
    cfg = BagelConfig.preset("tiny")
    Bagel(cfg).attach_vae(AutoEncoder(cfg.vae)).save_pretrained(path)
    ByteTokenizer().save_pretrained(path)
    return path
