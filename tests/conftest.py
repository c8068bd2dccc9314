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
