"""The packer reproduces the official packed layout of shared/reference/tiny/inputs.safetensors exactly."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bagel_ft.config import BagelConfig
from bagel_ft.tokenizer import SpecialTokens
from training.packing import CFGDropout, Packer, PackingGeometry, pack_samples
from training.sequence import VAE, VIT, SamplePlan, image_item, prepare_image, text_item

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tiny"
SPECIAL = SpecialTokens(bos_id=300, eos_id=301, vision_start_id=302, vision_end_id=303, end_of_text_id=304)
GEOM = PackingGeometry.from_model_config(BagelConfig.preset("tiny"))


def _image(name: str) -> torch.Tensor:
    return prepare_image(
        Image.open(REF / "images" / f"{name}.png"), max_size=4096, min_size=1, stride=2, max_pixels=10**9
    )


def reference_plans() -> list[SamplePlan]:
    """The two samples of inputs.json, as sample plans (enable_cfg 0 everywhere, like the reference)."""
    info = json.loads((REF / "inputs.json").read_text())
    texts = iter(info["texts"][k]["ids"] for k in ("text1", "text2", "text3", "text4"))
    images = iter(["img_vae_cond", "img_vit", "img_vae_target", "img_vae_target", "img_t2i"])
    plans = []
    for key in ("sample0", "sample1"):
        items = []
        for step in info["sequence_plans"][key]:
            if step["type"] == "text":
                items.append(text_item(next(texts), loss=bool(step["loss"]), enable_cfg=False))
            else:
                stride = GEOM.vit_patch if step["type"] == VIT else GEOM.latent_downsample
                kind = VIT if step["type"] == VIT else VAE
                items.append(image_item(kind, _image(next(images)), stride, loss=bool(step["loss"])))
        plans.append(SamplePlan(items, record_id=key))
    return plans


@pytest.fixture(scope="module")
def packed():
    return pack_samples(reference_plans(), SPECIAL, GEOM, torch.Generator().manual_seed(0))


def test_reference_index_tensors(packed):
    ref = load_file(str(REF / "inputs.safetensors"))
    info = json.loads((REF / "inputs.json").read_text())
    assert packed.sequence_length == info["sequence_length"]
    assert packed.sample_lens == info["sample_lens"]
    assert packed.split_lens == info["split_lens"]
    assert packed.attn_modes == info["attn_modes"]
    for name in [
        "packed_position_ids",
        "packed_text_ids",
        "packed_text_indexes",
        "ce_loss_indexes",
        "packed_label_ids",
        "packed_vae_token_indexes",
        "packed_latent_position_ids",
        "mse_loss_indexes",
        "packed_vit_token_indexes",
        "packed_vit_position_ids",
        "vit_token_seqlens",
    ]:
        torch.testing.assert_close(getattr(packed, name), ref[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(packed.ce_loss_weights, ref["ce_loss_weights"])
    assert [list(s) for s in packed.patchified_vae_latent_shapes] == ref["patchified_vae_latent_shapes"].tolist()
    torch.testing.assert_close(packed.padded_images, ref["padded_images"], rtol=0, atol=0)
    torch.testing.assert_close(packed.packed_vit_tokens, ref["packed_vit_tokens"], rtol=0, atol=0)
    # timesteps: -inf for clean images, one finite raw logit shared by all tokens of each noisy target
    ref_t = ref["packed_timesteps"]
    assert torch.equal(torch.isinf(packed.packed_timesteps), torch.isinf(ref_t))
    assert packed.noise.shape == ref["noise"].shape
    packed.validate()


def test_pack_is_deterministic_given_the_generator(packed):
    again = pack_samples(reference_plans(), SPECIAL, GEOM, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.packed_timesteps, packed.packed_timesteps)
    torch.testing.assert_close(again.noise, packed.noise)


def test_cfg_dropout_rules():
    # all context items droppable; with p=1 every one is dropped, supervised items stay
    plans = reference_plans()
    for plan in plans:
        for item in plan.items:
            item.enable_cfg = not item.loss
    b = pack_samples(plans, SPECIAL, GEOM, torch.Generator().manual_seed(0), CFGDropout(1.0, 1.0, 1.0))
    # sample 0 keeps text1 (CE), the noisy target and text3; dropped: clean VAE (+1), ViT (+1), text2 (+0),
    # clean copy (+1) -> text3 starts at rope 7 + 0 + ... : text1 0..6, +2 -> noisy at 9, copy dropped +1 -> text3 at 10
    assert b.attn_modes == ["causal", "noise", "causal", "noise"]
    assert b.split_lens == [7, 22, 4, 11]
    assert b.packed_position_ids[:7].tolist() == list(range(7))
    assert set(b.packed_position_ids[7:29].tolist()) == {9}
    assert b.packed_position_ids[29:33].tolist() == [10, 11, 12, 13]
    assert b.packed_position_ids[33:].tolist() == [0] * 11  # sample 1: prompt dropped, target at rope 0
    assert b.ce_loss_indexes.numel() == 9 and b.mse_loss_indexes.numel() == 29


def _plan(n_tokens: int, name: str) -> SamplePlan:
    return SamplePlan([text_item([65] * (n_tokens - 2), loss=True, enable_cfg=False)], record_id=name)


def test_packer_budget_buffer_and_skips():
    packer = Packer(
        expected_num_tokens=90,
        max_num_tokens=100,
        max_num_tokens_per_sample=60,
        prefer_buffer_before=50,
        max_buffer_size=1,
    )
    stream = iter([_plan(n, f"r{i}") for i, n in enumerate([40, 40, 30, 70, 10, 50, 20, 20, 20, 20, 20, 20])])
    with pytest.warns(UserWarning, match="skipped record r3"):
        packs = [packer.next_pack(lambda: next(stream)) for _ in range(3)]
    names = [[p.record_id for p in pack] for pack in packs]
    # r2 (30) does not fit 80+30 > 100 -> buffered; r3 (70) skipped; r4 fits (90) -> emit.
    assert names[0] == ["r0", "r1", "r4"]
    # next pack takes the buffer first (r2), then r5 (80), r6 (100)
    assert names[1] == ["r2", "r5", "r6"]
    assert names[2] == ["r7", "r8", "r9", "r10", "r11"]
    assert packer.stats.skipped == 1
    assert all(sum(p.num_tokens for p in pack) <= 100 for pack in packs)


def test_packer_stops_with_a_clear_error_when_no_sample_fits():
    """A dataset whose every sample is over-long must not spin forever skipping (a silent hang)."""
    from training.packing import MAX_CONSECUTIVE_SKIPS, PackingError

    packer = Packer(
        expected_num_tokens=90,
        max_num_tokens=100,
        max_num_tokens_per_sample=60,
        prefer_buffer_before=50,
        max_buffer_size=1,
    )
    lengths = iter([70, 80] * MAX_CONSECUTIVE_SKIPS)
    with (
        pytest.warns(UserWarning),
        pytest.raises(PackingError, match=r"shortest has 70 tokens.*max_num_tokens_per_sample"),
    ):
        packer.next_pack(lambda: _plan(next(lengths), "long"))
    # a sample that fits resets the run: isolated long samples are skipped, never fatal
    mixed = iter(([80] * (MAX_CONSECUTIVE_SKIPS - 1) + [30]) * 3)
    packer = Packer(
        expected_num_tokens=90,
        max_num_tokens=100,
        max_num_tokens_per_sample=60,
        prefer_buffer_before=50,
        max_buffer_size=1,
    )
    with pytest.warns(UserWarning):
        assert [p.num_tokens for p in packer.next_pack(lambda: _plan(next(mixed), "x"))] == [30, 30, 30]


def test_packer_carry_when_buffer_full():
    packer = Packer(
        expected_num_tokens=95,
        max_num_tokens=100,
        max_num_tokens_per_sample=100,
        prefer_buffer_before=0,
        max_buffer_size=0,
    )
    stream = iter([_plan(n, f"r{i}") for i, n in enumerate([60, 60, 30, 10])])
    first = packer.next_pack(lambda: next(stream))
    assert [p.record_id for p in first] == ["r0"]  # r1 does not fit and cannot be buffered: it opens the next pack
    second = packer.next_pack(lambda: next(stream))
    assert [p.record_id for p in second] == ["r1", "r2", "r3"]


# ---- record -> plan (docs/format.md section 3) -------------------------------------------------------------


def _trajectory(subset="trajectory"):
    from bagel_ft.trajectory import Trajectory, Turn, inspect_text, plan_text, refine_text

    images = [
        Image.new("RGB", (16, 16), (200, 30, 30)),
        Image.new("RGB", (16, 16), (30, 200, 30)),
        Image.new("RGB", (24, 16), (30, 30, 200)),
    ]
    turns = [
        Turn("plan", plan_text("add a red square", "a red square")),
        Turn("image", image=0),
        Turn("inspect", inspect_text("inconsistent", "too dark")),
        Turn("refine", refine_text("lighter")),
        Turn("image", image=1),
        Turn("inspect", inspect_text("consistent")),
        Turn("image", image=2, loss=False),
        Turn("caption", "a blue square"),
    ]
    return Trajectory(prompt="draw", turns=turns, images=images, subset=subset, meta={"seed": 1})


def _build(traj, **kw):
    from bagel_ft.tokenizer import ByteTokenizer
    from bagel_ft.transforms import ImageGeometry as Bounds
    from training.sequence import PlanGeometry, build_sample_plan

    geo = PlanGeometry(Bounds(32, 8, 56, 14, 10**6), GEOM.latent_downsample, GEOM.vit_patch)
    return build_sample_plan(traj, ByteTokenizer().encode, SPECIAL, geo, **kw)


def test_record_to_plan_follows_the_format():
    plan = _build(_trajectory())
    kinds = [(it.type, it.loss, it.enable_cfg, it.special_token_label) for it in plan.items]
    generated = [(VAE, True, False, None), (VAE, False, True, None), (VIT, False, True, None)]
    assert kinds == [
        ("text", False, True, None),  # prompt: context, droppable
        ("text", True, False, SPECIAL.vision_start_id),  # plan: a generated image follows
        *generated,  # noisy target + clean copy + ViT
        ("text", True, False, SPECIAL.bos_id),  # inspect: another text turn (refine) follows
        ("text", True, False, SPECIAL.vision_start_id),  # refine: the corrected image follows
        *generated,
        ("text", True, False, None),  # inspect: a GIVEN image follows, which the model does not choose
        (VAE, False, True, None),
        (VIT, False, True, None),  # given image: clean VAE + ViT only
        ("text", True, False, SPECIAL.end_of_text_id),  # the record ends here
    ]
    assert plan.items[2].image.shape == (3, 16, 16) and plan.items[11].image.shape == (3, 16, 24)
    assert plan.items[4].image.shape == (3, 14, 14)  # ViT: snapped to the 14 px patch
    assert plan.num_tokens == sum(it.num_tokens for it in plan.items)


def test_a_last_generated_image_gets_no_context_copies():
    """Official t2i plan: [text, vae_image(loss)] — the clean VAE / ViT copies serve only later tokens."""
    from bagel_ft.trajectory import Trajectory, Turn, inspect_text

    t2i = Trajectory("a red square", [Turn("image", image=0)], [Image.new("RGB", (16, 16), (200, 30, 30))], "t2i")
    kinds = [(it.type, it.loss) for it in _build(t2i).items]
    assert kinds == [("text", False), (VAE, True)]
    # the same image followed by a turn keeps its context (the inspect reads it)
    t2i.turns.append(Turn("inspect", inspect_text("consistent")))
    kinds = [(it.type, it.loss) for it in _build(t2i).items]
    assert kinds == [("text", False), (VAE, True), (VAE, False), (VIT, False), ("text", True)]


def test_loss_role_overrides_and_special_labels_in_the_pack():
    plan = _build(_trajectory("critique"), loss_roles={"critique": {"plan": False}, "*": {"caption": False}})
    assert [it.loss for it in plan.items if it.type == "text"] == [False, False, True, True, True, False]
    assert plan.items[1].special_token_label is None  # unsupervised turns carry no label
    plan = _build(_trajectory())
    b = pack_samples([plan], SPECIAL, GEOM, torch.Generator().manual_seed(0))
    labels = dict(zip(b.ce_loss_indexes.tolist(), b.packed_label_ids.tolist(), strict=True))
    eos_positions = [
        i
        for i, t in zip(b.packed_text_indexes.tolist(), b.packed_text_ids.tolist(), strict=True)
        if t == SPECIAL.eos_id
    ]
    s = SPECIAL
    assert [labels.get(p) for p in eos_positions] == [
        None,
        s.vision_start_id,
        s.bos_id,
        s.vision_start_id,
        None,
        s.end_of_text_id,
    ]


def test_resize_snaps_to_the_stride_within_bounds():
    from bagel_ft.transforms import resized_size

    assert resized_size(100, 60, max_size=64, min_size=32, stride=16, max_pixels=10**6) == (64, 32)
    assert resized_size(20, 20, max_size=64, min_size=32, stride=16, max_pixels=10**6) == (32, 32)
    assert resized_size(48, 32, max_size=64, min_size=32, stride=16, max_pixels=10**6) == (48, 32)  # unchanged
    w, h = resized_size(1000, 1000, max_size=1024, min_size=512, stride=16, max_pixels=512 * 512)
    assert w * h <= 512 * 512 and w % 16 == 0 and h % 16 == 0
