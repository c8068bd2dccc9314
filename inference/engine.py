"""The inference engine: contexts, cache updates, text decoding and flow-matching image generation.

Numerics and conventions are the official BAGEL inference path (`bagel.py` + `inferencer.py`, see
shared/reference/README.md sections 4-5); the structure is ours:

  * A `Context` is the official `{kv_lens, ropes, past_key_values}` of one sample: a `KVCache` (its length
    is kv_lens) and `rope`, the next RoPE id. `fork()` is O(1) (copy-on-write cache), which is how the CFG
    contexts, parallel streams and rollbacks share their prefix without recomputing it.
  * Cache updates append one segment, laid out by `bagel_ft.segments` (the packer's rule): a text segment
    (causal, und expert, consecutive RoPE ids, rope +=
    tokens), a clean VAE image (<|vision_start|> latents <|vision_end|>, bidirectional, t = 0, latents on
    the gen expert, one RoPE id, rope += 1) or a ViT image (same layout, und expert, rope += 1).
  * Text decoding feeds tokens one at a time on the cache (greedy / temperature / top-p, seeded). Every
    generated token is fed, so the cache always holds exactly the text produced so far and the logits
    after the last fed token are at hand (the draw / stop decision reads them after `<|im_end|>`).
    This equals the official re-prefill of the decoded text: causal attention makes them the same.
  * Image generation integrates the flow from noise (t = 1) to data (t = 0) with Euler steps on a shifted
    schedule (`bagel_ft.flow`); each step runs the conditional context and, inside the CFG interval, the
    cfg_text context (the state before the last text) and the cfg_img context (the texts only), combined
    by `bagel_ft.flow.cfg_combine`. Flow forwards `peek()` the caches: they never update them.
  * Batching: every method above that runs the model is a program (`inference.batching`): it yields ops
    (`inference.tick`: Tokens, Velocity, CleanImage, DecodeLatent), and `execute(ops)` runs a whole tick of
    them — the CFG branches of a step, or the steps of many samples (`run_batched`) — as ONE packed LLM forward
    in which each sample attends only to its own context. Called directly, a method runs alone, as before.

Shapes: H hidden, V vocab, N latent tokens of one image, D = p*p*z latent token features.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from bagel_ft.flow import cfg_combine, euler_step, in_cfg_interval, inference_schedule
from bagel_ft.tokenizer import ByteTokenizer, load_tokenizer
from bagel_ft.transforms import ImageGeometry, prepare_image
from inference.batching import Steps, batchable
from inference.kv_cache import KVCache
from inference.sampling import sample_token
from inference.settings import FlowSettings, TextSettings
from inference.tick import CleanImage, DecodeLatent, Tokens, Velocity, execute

# ---- contexts -----------------------------------------------------------------------------------------


@dataclass
class Context:
    """One sample's inference state: the official kv_lens (len(cache)), ropes (next RoPE id), cache."""

    cache: KVCache
    rope: int = 0

    @property
    def kv_len(self) -> int:
        return len(self.cache)

    def fork(self) -> Context:
        return Context(self.cache.fork(), self.rope)


@dataclass
class DecodeResult:
    ids: list[int]  # generated tokens after the start token (forced prefix included), stop token included if hit
    finished: bool  # a stop token was generated (and fed)
    last_logits: Tensor  # [V] logits after the last fed token (after `<|im_end|>`: the draw / stop decision)
    step_logits: Tensor | None = None  # [fed, V] logits after every fed token, when asked for


@dataclass
class FlowTrace:
    """Per-step record of `generate_latent` (for tests and debugging)."""

    t: list[float] = field(default_factory=list)
    x_t: list[Tensor] = field(default_factory=list)  # [N, D] input of each step
    v: list[Tensor] = field(default_factory=list)  # [N, D] combined velocity
    branches: list[list[Tensor]] = field(default_factory=list)  # raw velocities: cond, cfg_text, cfg_img


# ---- the engine -----------------------------------------------------------------------------------------


class Engine:
    """A `bagel_ft.Bagel` (with its VAE attached) + tokenizer, driven like the official inferencer.

    Every method below that touches the model is a program (`inference.batching.batchable`): called, it runs
    alone; its `.steps(...)` is the program, which `run_batched` runs together with others."""

    def __init__(self, model, tokenizer, geometry: ImageGeometry | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.geometry = (geometry or ImageGeometry()).within(self.config)

    @classmethod
    def from_pretrained(
        cls,
        ckpt: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        tokenizer: str = "auto",
        geometry: ImageGeometry | dict | None = None,
        attn_backend: str = "sdpa",
    ) -> Engine:
        """Load a checkpoint dir; tokenizer "auto" = the dir's tokenizer files, else the byte tokenizer for a
        byte-vocabulary (tiny) model, else the offline Qwen2.5 build; geometry None = the dir's
        image_geometry.json or the official defaults (a dict overrides fields of that); attn_backend: sdpa |
        flex | flash (bagel_ft.attention; every inference call is flash-compatible)."""
        from bagel_ft.modeling import Bagel

        model = Bagel.from_pretrained(ckpt, dtype=dtype, device=device).set_attn_backend(attn_backend)
        if not isinstance(geometry, ImageGeometry):
            geometry = replace(ImageGeometry.from_dir(ckpt), **(geometry or {}))
        return cls(model, resolve_tokenizer(tokenizer, ckpt, model.config.llm.vocab_size), geometry)

    def new_context(self) -> Context:
        return Context(KVCache(self.config.llm.num_hidden_layers))

    def _ids(self, ids) -> Tensor:
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)

    # ---- one tick: every op of every program in flight --------------------------------------------------
    def execute(self, ops: list) -> list:
        """Run one tick of ops (`inference.tick`) -> their results, in order: one packed LLM forward."""
        return execute(self, ops)

    @batchable
    def feed_tokens(self, ctx: Context, ids: list[int], all_logits: bool = False) -> Steps[Tensor]:
        """Append text tokens (causal, und, RoPE ids rope..rope+n-1; rope += n) -> logits [V] after the
        last token ([n, V] after each one when `all_logits`)."""
        (logits,) = yield [Tokens(ctx, list(ids), all_logits)]
        return logits

    @batchable
    def update_text(self, ctx: Context, text: str | list[int]) -> Steps[Tensor]:
        """A text segment `<|im_start|> text <|im_end|>` (the prompt, or a given text turn) -> logits after
        `<|im_end|>`."""
        ids = self.tokenizer.encode(text) if isinstance(text, str) else list(text)
        return (yield from self.feed_tokens.steps(ctx, [self.tokenizer.bos_id, *ids, self.tokenizer.eos_id]))

    @batchable
    def update_vae(self, ctx: Context, image: Image.Image | Tensor) -> Steps[None]:
        """A clean VAE image (t = 0; latents on the gen expert). PIL images are resized like training;
        a tensor [3, H, W] in [-1, 1] is taken as is (H, W multiples of latent_downsample)."""
        yield [CleanImage(ctx, image if isinstance(image, Tensor) else self.prepare_image(image, "vae"), "vae")]

    @batchable
    def update_vit(self, ctx: Context, image: Image.Image | Tensor) -> Steps[None]:
        """A ViT (understanding) image; PIL images are resized like training, tensors taken as is."""
        yield [CleanImage(ctx, image if isinstance(image, Tensor) else self.prepare_image(image, "vit"), "vit")]

    @batchable
    def update_image(self, ctx: Context, image: Image.Image, vae: bool = True, vit: bool = True) -> Steps[None]:
        """An image as context, the way training lays out a given or generated image: clean VAE, then ViT."""
        if vae:
            yield from self.update_vae.steps(ctx, image)
        if vit:
            yield from self.update_vit.steps(ctx, image)

    def prepare_image(self, image: Image.Image, which: str) -> Tensor:
        """PIL -> [3, H, W] in [-1, 1], resized for the VAE or ViT encoder like training."""
        g = self.geometry
        if which == "vae":
            return prepare_image(image, g.vae_max_size, g.vae_min_size, self.config.latent_downsample, g.max_pixels)
        return prepare_image(image, g.vit_max_size, g.vit_min_size, self.config.vit.patch_size, g.max_pixels)

    # ---- text ------------------------------------------------------------------------------------------
    @batchable
    def decode_text(
        self,
        ctx: Context,
        settings: TextSettings | None = None,
        generator: torch.Generator | None = None,
        prefix: list[int] = (),
        stop_ids: tuple[int, ...] | None = None,
        start_id: int | None = None,
        keep_step_logits: bool = False,
    ) -> Steps[DecodeResult]:
        """Feed `start_id` (bos) and the forced `prefix`, then sample until a stop token (fed too) or
        `max_tokens` generated tokens (forced ones count). Appends everything fed to `ctx`."""
        s = settings or TextSettings()
        stop = set(stop_ids if stop_ids is not None else (self.tokenizer.eos_id,))
        start = self.tokenizer.bos_id if start_id is None else start_id
        ids = list(prefix)
        logits = yield from self.feed_tokens.steps(ctx, [start, *ids], all_logits=keep_step_logits)
        steps = [logits] if keep_step_logits else []
        last = logits[-1] if keep_step_logits else logits
        while not (ids and ids[-1] in stop) and len(ids) < s.max_tokens:
            ids.append(sample_token(last, s.temperature, s.top_p, generator))
            last = yield from self.feed_tokens.steps(ctx, ids[-1:])
            if keep_step_logits:
                steps.append(last[None])
        return DecodeResult(
            ids=ids,
            finished=bool(ids) and ids[-1] in stop,
            last_logits=last,
            step_logits=torch.cat(steps) if keep_step_logits else None,
        )

    @torch.no_grad()
    def continuation_logprobs(self, ctx: Context, prefix: list[int], continuations: list[list[int]]) -> list[float]:
        """log P(continuation | ctx, prefix) for each continuation (teacher forced on forks; ctx untouched)."""
        base = ctx.fork()
        first = torch.log_softmax(self.feed_tokens(base, prefix), -1)  # predicts cont[0]
        out = []
        for cont in continuations:
            logp = first[cont[0]]
            if len(cont) > 1:  # row i predicts cont[i + 1]
                rows = torch.log_softmax(self.feed_tokens(base.fork(), cont[:-1], all_logits=True), -1)
                logp = logp + rows[torch.arange(len(cont) - 1), self._ids(cont[1:])].sum()
            out.append(float(logp))
        return out

    # ---- images ----------------------------------------------------------------------------------------
    @property
    def max_image_side(self) -> int:
        """Largest image side (pixels) the latent position table allows."""
        return self.config.latent_downsample * self.config.arch.max_latent_size

    def image_size(self, settings: FlowSettings) -> tuple[int, int]:
        """(height, width) to draw: the settings' sizes, where 0 means as large as the model can draw,
        up to the release's 1024 px (so the tiny model draws 32 px and the 7B model 1024 px by default)."""
        side = min(1024, self.max_image_side)
        return settings.height or side, settings.width or side

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) latent tokens of an image of height x width pixels; raises if the model cannot draw it."""
        f, side = self.config.latent_downsample, self.config.arch.max_latent_size
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be a multiple of latent_downsample {f}")
        h, w = height // f, width // f
        if not (0 < h <= side and 0 < w <= side):
            raise ValueError(f"image size {height}x{width} exceeds the latent table ({side * f} px per side max)")
        return h, w

    @batchable
    def velocity(self, ctx: Context, x_t: Tensor, t: float, h: int, w: int) -> Steps[Tensor]:
        """One flow forward of the official `_forward_flow` for one context (cache untouched): the latent
        tokens x_t [N, D] at time t, placed at ctx.rope -> velocity [N, D] (float32)."""
        (v,) = yield [Velocity(ctx, x_t, t, h, w)]
        return v

    def check_tokens(self, x_t: Tensor, n: int) -> None:
        if x_t.shape != (n, self.config.patch_latent_dim):
            raise ValueError(
                f"latent tokens: expected shape ({n}, {self.config.patch_latent_dim}), got {tuple(x_t.shape)}"
            )

    @batchable
    def generate_latent(
        self,
        gen: Context,
        cfg_text: Context | None,
        cfg_img: Context | None,
        settings: FlowSettings | None = None,
        generator: torch.Generator | None = None,
        x_init: Tensor | None = None,
        trace: FlowTrace | None = None,
    ) -> Steps[Tensor]:
        """Euler-integrate from noise (x_init, else randn from `generator`) to latent tokens [N, D] (float32).

        gen: the full context; cfg_text: the context before the last text (needed when cfg_text_scale > 1);
        cfg_img: the context of the texts only (needed when cfg_img_scale > 1). The CFG branches of a step
        are one packed forward (one tick)."""
        s = settings or FlowSettings()
        h, w = self.latent_grid(*self.image_size(s))
        n, d = h * w, self.config.patch_latent_dim
        x = (
            x_init.float().to(self.device)
            if x_init is not None
            else torch.randn(n, d, generator=generator).to(self.device)
        )
        self.check_tokens(x, n)
        timesteps, dts = inference_schedule(s.num_timesteps, s.timestep_shift)
        for t, dt in zip(timesteps.tolist(), dts.tolist(), strict=True):
            guided = in_cfg_interval(t, s.cfg_interval)
            text_scale = s.cfg_text_scale if guided else 1.0
            img_scale = s.cfg_img_scale if guided else 1.0
            contexts = [gen]
            if text_scale > 1.0:
                contexts.append(_need(cfg_text, "cfg_text"))
                if img_scale > 1.0:
                    contexts.append(_need(cfg_img, "cfg_img"))
            branches = yield [Velocity(c, x, t, h, w) for c in contexts]
            v = cfg_combine(
                branches[0],
                branches[1] if len(branches) > 1 else None,
                branches[2] if len(branches) > 2 else None,
                text_scale,
                img_scale,
                s.cfg_renorm_type,
                s.cfg_renorm_min,
            )
            if trace is not None:
                trace.t.append(t)
                trace.x_t.append(x)
                trace.v.append(v)
                trace.branches.append(branches)
            x = euler_step(x, v, dt)
        return x

    @batchable
    def decode_latent(self, tokens: Tensor, height: int, width: int) -> Steps[Tensor]:
        """Latent tokens [N, D] -> decoded image [3, H, W] (float, ~[-1, 1], unclamped)."""
        (image,) = yield [DecodeLatent(tokens, *self.latent_grid(height, width))]
        return image

    @batchable
    def generate_image(
        self,
        gen: Context,
        cfg_text: Context | None,
        cfg_img: Context | None,
        settings: FlowSettings | None = None,
        generator: torch.Generator | None = None,
    ) -> Steps[Image.Image]:
        """`generate_latent` + `decode_latent` -> PIL image."""
        s = settings or FlowSettings()
        latent = yield from self.generate_latent.steps(gen, cfg_text, cfg_img, s, generator)
        return to_pil((yield from self.decode_latent.steps(latent, *self.image_size(s))))


def _need(ctx: Context | None, name: str) -> Context:
    if ctx is None:
        raise ValueError(f"{name} context is required by the CFG settings (scale > 1) but was not given")
    return ctx


# ---- images <-> tensors ------------------------------------------------------------------------------------


def to_pil(image: Tensor) -> Image.Image:
    """Decoded [3, H, W] ~[-1, 1] -> RGB PIL, as the official `decode_image` ((x*0.5+0.5).clamp*255, truncated)."""
    x = ((image.float() * 0.5 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0).to(torch.uint8)
    return Image.fromarray(x.cpu().numpy())


def resolve_tokenizer(spec: str, ckpt: str | Path, vocab_size: int):
    """ "auto": the checkpoint's tokenizer files if any, else the byte tokenizer when the vocabulary is the
    byte tokenizer's (the tiny model), else the offline Qwen2.5 tokenizer. Otherwise `load_tokenizer(spec)`."""
    if spec != "auto":
        return load_tokenizer(spec)
    ckpt = Path(ckpt)
    if (ckpt / "tokenizer_config.json").is_file() or (ckpt / "tokenizer.json").is_file():
        return load_tokenizer(ckpt)
    return ByteTokenizer() if vocab_size == ByteTokenizer.vocab_size else load_tokenizer("qwen2.5")
