"""FLUX.1 Kontext as the trajectory editor (`pip install -e ".[kontext]"`), through diffusers on CPU.

The test builds a tiny random FluxKontextPipeline (FluxTransformer2DModel, AutoencoderKL, CLIP and T5 text
encoders from small configs; both tokenizers from small vocabularies written here; nothing from a hub) and
saves it with `save_pretrained`; `bagel-ft data trajectories` runs with `backends.editor=kontext` on that
folder. A random editor draws noise that the shapes judge would reject, so the judge is the VLM one (as in
configs/data/gpt4o.yaml), answered by a local fake endpoint that accepts an image when it has the size the
run asked for: the images the editor hands on are what the judge checks."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import string

import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers", reason="the kontext extra is not installed: pip install -e '.[kontext]'")

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from bagel_ft.cli import main  # noqa: E402
from bagel_ft.trajectory import Trajectory, normalize_row  # noqa: E402
from data_gen.backends import make_backends  # noqa: E402
from data_gen.backends.models import KontextEditor  # noqa: E402
from data_gen.config import load_config  # noqa: E402
from data_gen.errors import FatalError  # noqa: E402
from data_gen.shards import merge  # noqa: E402
from data_gen.summary import Summary  # noqa: E402
from inference.call_cache import CallCache  # noqa: E402
from scene_graphs import Step  # noqa: E402

SIZE = 48  # a multiple of 16, as FLUX.1 needs (the tiny VAE needs multiples of 4)
STEP = Step("add", None, "draw a red circle", "a red circle")


@pytest.fixture(scope="module")
def offline():
    """No hub: offline mode (huggingface_hub reads HF_HUB_OFFLINE at import, so its constant too)."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory, offline):
    """A tiny random FLUX.1 Kontext pipeline, saved as diffusers would ship one."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    chars = list(string.ascii_lowercase + string.digits + ".,'-")
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:  # byte-level BPE without merges: a character, or a character that ends a word
        clip_vocab[c], clip_vocab[c + "</w>"] = len(clip_vocab), len(clip_vocab) + 1
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]  # unigram pieces with scores
    t5_vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tokenizer_2 = T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=512)
    assert tokenizer.unk_token_id not in tokenizer("draw a red circle").input_ids[1:-1]
    assert tokenizer_2.unk_token_id not in tokenizer_2("draw a red circle").input_ids

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        )
    )  # fmt: skip
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0,
        )
    )  # fmt: skip
    # FLUX's VAE in miniature (FLUX.1: 16 latent channels, stride 8; here 2 and 2), no quant convs
    vae = AutoencoderKL(
        block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=2, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    # in_channels: the latent channels of 2 x 2 packed patches; the rope axes sum to the head dim
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 2, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-flux-kontext")
    pipe.save_pretrained(path)
    return path


@pytest.fixture
def calls(monkeypatch):
    """Counts FluxKontextPipeline loads and calls (and the dtype / device each call ran in); runs them."""
    from diffusers import FluxKontextPipeline

    seen = {"loads": 0, "calls": []}
    load, call = FluxKontextPipeline.from_pretrained.__func__, FluxKontextPipeline.__call__

    def counted_load(cls, *args, **kwargs):
        seen["loads"] += 1
        return load(cls, *args, **kwargs)

    def counted_call(self, *args, **kwargs):
        seen["calls"].append((self.transformer.dtype, self.transformer.device.type, kwargs["image"].size))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained", classmethod(counted_load))
    monkeypatch.setattr(FluxKontextPipeline, "__call__", counted_call)
    return seen


def judge_by_size(seen: list[tuple[int, int]]):
    """A VLM judge that accepts an image of SIZE x SIZE (and notes every size it is shown)."""

    def answer(body: dict) -> str:
        parts = next(m["content"] for m in body["messages"] if m["role"] == "user")
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        size = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size
        seen.append(size)
        if size == (SIZE, SIZE):
            return json.dumps({"verdict": "consistent", "analysis": "", "fix": ""})
        return json.dumps({"verdict": "inconsistent", "analysis": f"the image is {size}", "fix": "redraw it"})

    return answer


def read_records(out) -> list[Trajectory]:
    return [Trajectory.from_row(normalize_row(row)) for row in merge([out])]  # from_row validates


def data(*args: str, sets: list[str]) -> int:
    """`bagel-ft data ARGS --set S ...` in this process."""
    return main(["data", *args, *[a for s in sets for a in ("--set", s)]])


def test_trajectories_drawn_by_kontext_are_written_and_a_rerun_comes_from_the_cache(kontext_dir, calls, tmp_path):
    judged: list[tuple[int, int]] = []
    with FakeOpenAIServer(judge_by_size(judged)) as server:
        sets = [
            "backends.editor=kontext", f"kontext.model={kontext_dir}", "kontext.steps=2",
            f"pipeline.image_size={SIZE}", "pipeline.min_steps=1", "pipeline.max_steps=2",
            "backends.judge=vlm", f"endpoint.base_url={server.url}", "endpoint.model=fake-vlm",
            "endpoint.api_key_env=''",
        ]  # fmt: skip
        out = tmp_path / "traj"
        assert data("trajectories", "--out", str(out), "--num", "3", sets=sets) == 0
        summary = json.loads(next(out.glob("summary-*.json")).read_text())
        records = read_records(out)
        assert summary["total"]["kept"] == 3 == len(records) and not summary["total"]["failed"]
        images = [im for r in records for im in r.images]
        assert {im.size for im in images} == {(SIZE, SIZE)} and set(judged) == {(SIZE, SIZE)}
        assert all(r.meta["backends"]["editor"] == "kontext" for r in records)
        # one pipeline load, one call per drawn image, each given the previous image at the canvas size,
        # in fp32 on CPU (kontext.dtype / device auto)
        assert calls["loads"] == 1 and len(calls["calls"]) == len(images)
        assert set(calls["calls"]) == {(torch.float32, "cpu", (SIZE, SIZE))}
        assert summary["cache"]["kontext.edit"] == {"hits": 0, "misses": len(images)}

        again = tmp_path / "again"  # new output, the first run's cache: no pipeline load, no call
        assert data("trajectories", "--out", str(again), "--num", "3", "--cache", str(out / "cache"), sets=sets) == 0
    assert calls["loads"] == 1 and len(calls["calls"]) == len(images)
    summary = json.loads(next(again.glob("summary-*.json")).read_text())
    assert summary["cache"]["kontext.edit"] == {"hits": len(images), "misses": 0}
    assert [[im.tobytes() for im in r.images] for r in read_records(again)] == [
        [im.tobytes() for im in r.images] for r in records
    ]


def edit_once(cfg_sets: list[str], cache: CallCache) -> Image.Image:
    async def run() -> Image.Image:
        backends = make_backends(load_config(None, cfg_sets), cache, Summary())
        return (await backends.editor.edit(None, STEP, seed=3)).image

    return asyncio.run(run())


def test_kontext_dtype_and_device_come_from_the_config(kontext_dir, calls, tmp_path, monkeypatch):
    sets = [f"kontext.model={kontext_dir}", "kontext.steps=2", f"pipeline.image_size={SIZE}"]
    cache = CallCache(tmp_path / "cache")

    def editor(*extra: str) -> KontextEditor:
        return make_backends(load_config(None, ["backends.editor=kontext", *sets, *extra]), cache, Summary()).editor

    assert (editor().device, editor().dtype) == ("cpu", "fp32")  # auto on a CPU machine
    with monkeypatch.context() as mp:  # auto on a GPU machine (nothing loads before the first edit)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        assert (editor().device, editor().dtype) == ("cuda", "bf16")
    assert editor().model_id != editor("kontext.dtype=bf16").model_id != editor("kontext.steps=3").model_id

    fp32 = edit_once(["backends.editor=kontext", *sets], cache)
    bf16 = edit_once(["backends.editor=kontext", *sets, "kontext.dtype=bf16"], cache)
    assert [c[:2] for c in calls["calls"]] == [(torch.float32, "cpu"), (torch.bfloat16, "cpu")]
    assert fp32.size == bf16.size == (SIZE, SIZE)
    assert cache.stats()["kontext.edit"] == {"hits": 0, "misses": 2}  # another dtype is another cached output
    assert edit_once(["backends.editor=kontext", *sets], cache).tobytes() == fp32.tobytes()
    assert len(calls["calls"]) == 2


def test_kontext_refuses_a_size_it_cannot_draw_and_a_missing_model(kontext_dir, tmp_path):
    cache = CallCache(tmp_path / "cache")
    base = ["backends.editor=kontext", "kontext.steps=1"]
    with pytest.raises(FatalError, match=r"pipeline.image_size=50: .* multiples of 4"):
        edit_once([*base, f"kontext.model={kontext_dir}", "pipeline.image_size=50"], cache)
    with pytest.raises(FatalError, match=r"kontext.model '.*nope': cannot load a FluxKontextPipeline"):
        edit_once([*base, f"kontext.model={tmp_path / 'nope'}", f"pipeline.image_size={SIZE}"], cache)
    from data_gen.config import ConfigError

    with pytest.raises(ConfigError, match="kontext.dtype: expected one of"):
        load_config(None, [*base, "kontext.dtype=fp8"])
