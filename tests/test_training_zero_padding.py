"""training.uniform: the dummy sample leaves the real losses unchanged and makes every module run (ZeRO-2/3)."""

import pytest
import torch

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.config import BagelConfig
from bagel_ft.modeling import Bagel
from bagel_ft.tokenizer import SpecialTokens
from training.config import load_config
from training.losses import ce_sum, mse_sum
from training.parallelize import DistEnv
from training.synthetic import write_table
from training.trainer import build_streams, build_tokenizer
from training.uniform import pad_unused_modules, strip_dummy

TINY = "configs/train/tiny_cpu.yaml"


@pytest.mark.parametrize(
    "overrides, want",
    [
        (["data.vit_cond_dropout_prob=1.0"], (True, False)),  # no ViT tokens: dummy ViT patch
        # captions with both images dropped: text only -> dummy ViT patch and dummy noisy latent token
        (["data.vit_cond_dropout_prob=1.0", "data.vae_cond_dropout_prob=1.0", "subsets"], (True, True)),
    ],
)
def test_padding_keeps_losses_and_reaches_every_parameter(tmp_path, overrides, want):
    data = write_table(tmp_path / "data", records=16, size=(16, 16), rows_per_file=16)
    source = f"{{path: {data}, subsets: [caption]}}" if "subsets" in overrides else f"{{path: {data}}}"
    cfg = load_config(TINY, [f"data.sources=[{source}]", "data.prefetch=0", *[o for o in overrides if "=" in o]])
    mcfg = BagelConfig.preset("tiny")
    torch.manual_seed(0)
    model = Bagel(mcfg).attach_vae(AutoEncoder(mcfg.vae))
    tok = build_tokenizer(cfg)
    batch = build_streams(cfg, mcfg, tok, DistEnv(0, 1, 0, None))[0].stream.next_pack().batch
    if batch.padded_images is not None:
        batch.padded_latent = model.vae.encode(batch.padded_images, sample=False)

    out = model(batch)
    padded, padding = pad_unused_modules(batch, mcfg, SpecialTokens.of(tok))
    assert (padding.vit, padding.vae) == want
    padded.validate()  # the dummy's blocks are laid out like any image block (bagel_ft.segments)
    assert padded.sequence_length == batch.sequence_length + 3 * sum(want)
    out2, zero = strip_dummy(model(padded), padding)
    for a, b in [(out.ce_logits, out2.ce_logits), (out.mse_pred, out2.mse_pred), (out.mse_target, out2.mse_target)]:
        if a is None:  # an unsupervised head runs on 0 rows
            assert b is None or b.numel() == 0
        else:
            torch.testing.assert_close(a, b)
    losses = (ce_sum(out2.ce_logits, padded.packed_label_ids), mse_sum(out2.mse_pred, out2.mse_target))
    (sum(x for x in losses if x is not None) + zero).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
