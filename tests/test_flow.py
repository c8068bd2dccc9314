"""bagel_ft.flow vs the official reference: training timesteps, interpolation/target, the inference schedule,
CFG recombination of the stored raw branch velocities, and the Euler trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_ft import flow

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
TINY = REF / "tiny"
# only the tests that read the reference skip without it; pure-function tests always run
needs_ref = pytest.mark.skipif(not TINY.is_dir(), reason=f"reference data not found at {TINY}")


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def inf():
    return load_file(TINY / "inference_outputs.safetensors")


@pytest.fixture(scope="module")
def inf_json():
    return json.loads((TINY / "inference.json").read_text())


# ---- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shift,key", [(1.0, "timesteps_after_sigmoid_shift"), (3.0, "shift3_timesteps_after_sigmoid_shift")]
)
@needs_ref
def test_training_timesteps(shift, key):
    raw = load_file(TINY / "inputs.safetensors")["packed_timesteps"]
    t = flow.training_timesteps(raw, shift)
    assert _max_abs(t, load_file(TINY / "outputs.safetensors")[key]) <= 1e-6
    assert (t[torch.isinf(raw)] == 0).all()  # clean images: raw -inf -> t = 0 exactly


@needs_ref
def test_interpolation_and_target():
    inputs = load_file(TINY / "inputs.safetensors")
    outputs = load_file(TINY / "outputs.safetensors")
    x0, noise = inputs["packed_latent_clean"], inputs["noise"]
    t = outputs["timesteps_after_sigmoid_shift"]
    assert _max_abs(flow.interpolate(x0, noise, t), outputs["x_t_packed_latent"]) <= 1e-6
    has_mse = t > 0
    assert _max_abs(flow.velocity_target(x0, noise)[has_mse], outputs["mse_target"]) <= 1e-6


def test_shift_and_raw_sampling():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(flow.shift_timesteps(t, 1.0), t)
    assert flow.shift_timesteps(t, 3.0).tolist() == pytest.approx([0.0, 0.5, 0.75, 1.0])
    a = flow.sample_raw_timesteps(4096, torch.Generator().manual_seed(0))
    b = flow.sample_raw_timesteps(4096, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1.0) < 0.1


# ---- inference --------------------------------------------------------------------------------------


@needs_ref
@pytest.mark.parametrize("scenario", ["A", "B"])
def test_inference_schedule(inf, inf_json, scenario):
    settings = inf_json[f"{scenario}.euler"]["settings"]
    ts, dts = flow.inference_schedule(settings["num_timesteps"], settings["timestep_shift"])
    assert torch.equal(ts, inf[f"{scenario}.euler_step_t"])
    assert dts.tolist() == pytest.approx(inf_json[f"{scenario}.euler"]["dts"], abs=1e-7)
    assert ts.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=1e-6)


@needs_ref
@pytest.mark.parametrize("scenario", ["A", "B"])
def test_cfg_combine_and_euler_reproduce_reference(inf, inf_json, scenario):
    s = inf_json[f"{scenario}.euler"]["settings"]
    ts, dts = flow.inference_schedule(s["num_timesteps"], s["timestep_shift"])
    x_t = inf[f"{scenario}.euler_x_init"]
    worst_v = worst_x = 0.0
    for i, t in enumerate(ts):
        assert flow.in_cfg_interval(t, s["cfg_interval"])
        worst_x = max(worst_x, _max_abs(x_t, inf[f"{scenario}.euler_step_x_t"][i]))
        branches = [inf[f"{scenario}.euler_step_branch{b}_v"][i] for b in range(3 if scenario == "B" else 2)]
        v_uncond_img = branches[2] if scenario == "B" else None
        v = flow.cfg_combine(
            branches[0], branches[1], v_uncond_img, s["cfg_text_scale"], s["cfg_img_scale"],
            s["cfg_renorm_type"], s["cfg_renorm_min"],
        )  # fmt: skip
        worst_v = max(worst_v, _max_abs(v, inf[f"{scenario}.euler_step_v"][i]))
        x_t = flow.euler_step(x_t, v, dts[i])
    assert worst_v <= 1e-5
    assert worst_x <= 1e-5
    assert _max_abs(x_t, inf[f"{scenario}.euler_final_latent"]) <= 1e-5


def test_cfg_combine_rules():
    g = torch.Generator().manual_seed(0)
    cond, un_t, un_i = (torch.randn(5, 8, generator=g) for _ in range(3))
    # no guidance unless text_scale > 1 (official behaviour, even with img_scale > 1)
    assert flow.cfg_combine(cond, un_t, un_i, 1.0, 2.0) is cond
    # without renorm clamping (renorm_min=1 forces scale 1), plain two-stage CFG
    v_text = un_t + 4.0 * (cond - un_t)
    expect = un_i + 2.0 * (v_text - un_i)
    got = flow.cfg_combine(cond, un_t, un_i, 4.0, 2.0, "global", renorm_min=1.0)
    assert torch.allclose(got, expect)
    # 'global' renorm: the result is no longer than cond (over all elements)
    v = flow.cfg_combine(cond, un_t, None, 4.0, 1.0, "global")
    assert v.norm() <= cond.norm() * (1 + 1e-6)
    # 'channel': per token no longer than cond
    v = flow.cfg_combine(cond, un_t, un_i, 4.0, 2.0, "channel")
    assert (v.norm(dim=-1) <= cond.norm(dim=-1) * (1 + 1e-6)).all()
    with pytest.raises(ValueError):
        flow.cfg_combine(cond, un_t, None, 4.0, 1.0, "bogus")
    assert not flow.in_cfg_interval(0.3, [0.4, 1.0])
    assert flow.in_cfg_interval(1.0, [0.4, 1.0])
    assert not flow.in_cfg_interval(0.4, [0.4, 1.0])


def test_euler_recovers_x0_for_exact_velocity():
    # with the true (constant) velocity eps - x0, Euler from pure noise lands exactly on x0
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    ts, dts = flow.inference_schedule(7, 3.0)
    x = eps
    for t, dt in zip(ts, dts, strict=True):
        assert torch.allclose(x, flow.interpolate(x0, eps, t), atol=1e-5)
        x = flow.euler_step(x, flow.velocity_target(x0, eps), dt)
    assert torch.allclose(x, x0, atol=1e-5)
