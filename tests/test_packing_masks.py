"""Masks of packed sequences: equal to the official nested masks; sample isolation, hidden noisy images, CE counts."""

import random

import torch
from safetensors.torch import load_file
from test_packing import GEOM, REF, SPECIAL, reference_plans

from bagel_ft.attention import AttentionSpec, build_sample_masks
from training.packing import CFGDropout, pack_samples
from training.sequence import VAE, VIT, SamplePlan, image_item, text_item


def test_reference_pack_masks_equal_official_nested_masks():
    b = pack_samples(reference_plans(), SPECIAL, GEOM, torch.Generator().manual_seed(0))
    masks = build_sample_masks(AttentionSpec(b.sample_lens, b.split_lens, b.attn_modes))
    ref = load_file(str(REF / "inputs.safetensors"))
    for i, m in enumerate(masks):
        assert torch.equal(m, ref[f"nested_attention_mask_{i}"] == 0), f"sample {i}"


def _random_plan(rng: random.Random, name: str) -> SamplePlan:
    """prompt | random text turns and images (generated = noisy + clean + ViT, given = clean + ViT)."""
    items = [text_item([rng.randrange(256) for _ in range(rng.randint(0, 5))], loss=False, enable_cfg=True)]
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.5:
            loss = rng.random() < 0.7
            label = rng.choice([None, SPECIAL.vision_start_id, SPECIAL.end_of_text_id]) if loss else None
            items.append(text_item([rng.randrange(256) for _ in range(rng.randint(1, 6))], loss, not loss, label))
        else:
            h, w = rng.choice([4, 8, 12]), rng.choice([4, 8])
            vae = torch.rand(3, h, w) * 2 - 1
            if rng.random() < 0.5:
                items.append(image_item(VAE, vae, GEOM.latent_downsample, loss=True))
            items.append(image_item(VAE, vae, GEOM.latent_downsample, loss=False, enable_cfg=True))
            items.append(image_item(VIT, torch.rand(3, 14, 28) * 2 - 1, GEOM.vit_patch, loss=False, enable_cfg=True))
    return SamplePlan(items, record_id=name)


def test_random_packs_isolation_noise_hidden_and_ce_counts():
    rng = random.Random(0)
    for trial in range(20):
        plans = [_random_plan(rng, f"t{trial}s{i}") for i in range(rng.randint(1, 4))]
        dropout = CFGDropout(0.3, 0.3, 0.3) if trial % 2 else CFGDropout()
        b = pack_samples(plans, SPECIAL, GEOM, torch.Generator().manual_seed(trial), dropout)
        b.validate()
        allowed = torch.block_diag(*build_sample_masks(AttentionSpec(b.sample_lens, b.split_lens, b.attn_modes)))
        L = b.sequence_length
        sample_of = torch.repeat_interleave(torch.arange(len(b.sample_lens)), torch.tensor(b.sample_lens))
        segment_of = torch.repeat_interleave(torch.arange(len(b.split_lens)), torch.tensor(b.split_lens))
        # 1. tokens attend only within their sample
        assert not (allowed & (sample_of[:, None] != sample_of[None, :])).any()
        # 2. nobody outside a noisy image attends to it
        noisy = torch.zeros(L, dtype=torch.bool)
        for s, mode in enumerate(b.attn_modes):
            if mode == "noise":
                noisy |= segment_of == s
        outside = segment_of[:, None] != segment_of[None, :]
        assert not (allowed & outside & noisy[None, :]).any()
        # 3. every token sees itself; text is causal within its segment
        assert allowed.diagonal().all()
        # 4. CE / MSE counts match the plans (supervised items are never dropped)
        ce_expected = sum(
            len(it.text_ids) + 1 + (it.special_token_label is not None)
            for p in plans
            for it in p.items
            if it.type == "text" and it.loss
        )
        assert (0 if b.ce_loss_indexes is None else b.ce_loss_indexes.numel()) == ce_expected
        mse_expected = sum(it.num_tokens - 2 for p in plans for it in p.items if it.type == VAE and it.loss)
        assert (0 if b.mse_loss_indexes is None else b.mse_loss_indexes.numel()) == mse_expected
        # CE labels sit on text positions, MSE on VAE positions
        text_pos = set(b.packed_text_indexes.tolist())
        if b.ce_loss_indexes is not None:
            assert set(b.ce_loss_indexes.tolist()) <= text_pos
        if b.mse_loss_indexes is not None:
            assert set(b.mse_loss_indexes.tolist()) <= set(b.packed_vae_token_indexes.tolist())
