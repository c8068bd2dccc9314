"""The four sections of benchmarks/gpu_check.py (see its docstring): each a generator of table rows, run on
`Run.device` at 7B widths, or at the tiny preset's with --smoke. `Run` carries the options, the section's deadline
and the timing helpers (CUDA-synchronised wall clock, medians that stop when the budget runs low)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bagel_ft.attention import AttentionSpec, attend, prepare_mask
from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.batch import PackedBatch
from bagel_ft.config import BagelConfig
from bagel_ft.modeling import Bagel
from bagel_ft.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "train" / "psir_bagel7b_8xh100.yaml"
H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 spec (training.metrics.PEAK_TFLOPS)
GOAL_MFU, GOAL_MEMORY = 0.40, 0.10  # torchtitan's Llama-3-8B MFU on H100; estimate within 10% of the measured peak
TOL_FP32 = 1e-4  # the reference tests' tolerance (the README measured ~1e-5 between CPU thread counts)
OFFICIAL_BF16 = {  # max abs spread of the official bf16 recipe from the fp32 reference (README section 6)
    "ce_logits": 0.021,
    "mse_pred": 0.026,
    "llm_final_hidden": 0.040,
    "greedy logits": 0.025,
    "velocity": 0.025,
    "A final latent": 0.038,
    "B final latent": 0.082,
}


@dataclass
class Row:
    section: str
    check: str
    result: str
    goal: str = ""
    status: str = ""  # ok | FAIL | ERROR | skipped | "" (a measurement without a goal)
    data: dict = field(default_factory=dict)  # the numbers, for gpu_check.json


def judged(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "FAIL")


@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    tokenizer: object
    tokenizer_note: str = ""
    deadline: float = float("inf")
    _matmul: float | None = None

    @property
    def smoke(self) -> bool:
        return self.args.smoke

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def median_seconds(self, fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
        """Median of up to `repeat` timed calls after `warmup` ones; fewer when the section's budget runs low."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            times.append(self.seconds(fn))
            if self.left() < 3 * times[-1] + 10:
                break
        return statistics.median(times)

    def matmul_tflops(self) -> float:
        """A plain bf16 matmul (n x n x n) timed here: the device's practical dense peak, measured once per run."""
        if self._matmul is None:
            n = 256 if self.smoke else 8192
            a, b = (torch.randn(n, n, device=self.device, dtype=torch.bfloat16) for _ in range(2))
            self._matmul = 2 * n**3 / self.median_seconds(lambda: a @ b, repeat=10, warmup=3) / 1e12
        return self._matmul

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


def gib(nbytes: float) -> float:
    return nbytes / 2**30


# ---- shapes and data --------------------------------------------------------------------------------------


def model_config(run: Run, layers: int) -> BagelConfig:
    """The tiny preset in --smoke; else BAGEL-7B-MoT (full widths, vocabulary and ViT) with `layers` LLM layers."""
    if run.smoke:
        return BagelConfig.preset("tiny")
    cfg = BagelConfig.preset("bagel-7b-mot")
    cfg.llm.num_hidden_layers = layers
    return cfg


def shapes_note(run: Run, layers: int) -> str:
    if run.smoke:
        return "tiny preset (2 layers, hidden 64)"
    return f"7B-MoT widths, {layers} of 28 LLM layers"


def build_model(run: Run, mcfg: BagelConfig, dtype=torch.float32, vae: bool = True) -> Bagel:
    """Random weights, built on the device directly (a 7B-width model initialised on the CPU takes minutes)."""
    torch.manual_seed(0)
    with torch.device(run.device):
        model = Bagel(mcfg)
        if vae:
            model.attach_vae(AutoEncoder(mcfg.vae))
    return model.to(run.device, dtype)


def training_config(run: Run, tokens: int, run_dir: str):
    """The 8xH100 recipe on one device: random init, no sharding, no EMA (the fp32 copy would not fit next to 4
    layers' AdamW states), packs of `tokens` (the recipe's 32768 / 36864 ratio for the hard limit), CFG dropout
    off: the packer counts tokens before dropout, so the recipe's 0.1 / 0.3 / 0.3 leave ~60% of the budget in a
    pack of these records (~22K tokens of 36,864) and the check would not measure ~32K-token packs."""
    from training.config import load_config

    limit = tokens * 36864 // 32768
    overrides = [
        "model.init=random",
        f"model.preset={'tiny' if run.smoke else 'bagel-7b-mot'}",
        f"train.device={run.device.type}",
        "train.dtype=bf16",
        "train.sharding=none",
        "train.activation_checkpointing=true",
        "optim.ema_decay=0",
        f"run.dir={run_dir}",
        f"data.expected_num_tokens={tokens}",
        f"data.max_num_tokens={limit}",
        f"data.max_num_tokens_per_sample={min(16384, limit)}",
        f"data.prefer_buffer_before={tokens // 2}",
        "data.text_cond_dropout_prob=0",
        "data.vit_cond_dropout_prob=0",
        "data.vae_cond_dropout_prob=0",
    ]
    if run.smoke:  # the tiny model draws at most 32 px (table side 8 x 4 px per token); ViT table 8 x 14 px
        overrides += ["data.vae_max_size=32", "data.vae_min_size=16", "data.vit_max_size=56", "data.vit_min_size=28"]
    return load_config(RECIPE, overrides)


def psir_pack(run: Run, cfg, mcfg: BagelConfig, section: str):
    """One pack of synthetic PSIR trajectories (plan / image / inspect turns, t2i and caption records) from the
    training data stream: the packer, timesteps and noise of a real run (CFG dropout off, see training_config).
    Returns (pack, a row on it)."""
    from training.data import DataStream
    from training.synthetic import SyntheticTable
    from training.trainer import stream_spec

    start = time.perf_counter()
    side = 32 if run.smoke else 512  # 512 px: 1024 latent tokens per VAE image, records under 16K tokens
    table = SyntheticTable(records=64, seed=0, size=(side, side))
    stream = DataStream([table], [1.0], stream_spec(cfg, mcfg, run.tokenizer), seed=0, stream=0, num_streams=1)
    pack = stream.next_pack()
    batch, seconds = pack.batch, time.perf_counter() - start
    subsets = {r.id: r.subset for r in table.records}
    kinds = [subsets[i] for i in pack.record_ids]
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    ce = batch.ce_loss_indexes.numel() if batch.ce_loss_indexes is not None else 0
    mse = batch.mse_loss_indexes.numel() if batch.mse_loss_indexes is not None else 0
    vit = batch.packed_vit_tokens.shape[0] if batch.has_vit else 0
    return pack, Row(
        section,
        f"packed PSIR batch ({side} px synthetic trajectories, training packer, CFG dropout off)",
        f"{batch.sequence_length} tokens, {len(batch.sample_lens)} samples {counts}, {len(batch.split_lens)} "
        f"segments; {ce} CE / {mse} MSE / {vit} ViT tokens; packed in {seconds:.1f} s",
        data={"tokens": batch.sequence_length, "sample_lens": batch.sample_lens, "ce": ce, "mse": mse, "vit": vit},
    )


def block_mask_row(run: Run, section: str, spec: AttentionSpec) -> tuple[Row, object]:
    first = run.seconds(lambda: prepare_mask(spec, "flex", run.device))  # compiles on CUDA
    start = time.perf_counter()
    mask = prepare_mask(spec, "flex", run.device)
    run.sync()
    again = time.perf_counter() - start
    sparsity = mask.block_mask.sparsity()  # % of (128 x 128) blocks skipped
    return Row(
        section,
        "FlexAttention block mask of the pack",
        f"{sparsity:.1f}% of blocks skipped; built in {again * 1e3:.0f} ms (first build {first:.1f} s)",
        data={"sparsity_pct": sparsity, "build_s": again, "first_build_s": first},
    ), mask


# ---- 1. parity -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_fp32():
    """No TF32 in fp32 matmuls / convolutions (cuDNN allows it by default: ~1e-3 errors in the VAE)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def training_forward_errors(model: Bagel, batch: PackedBatch, ref: dict, autocast: bool) -> dict[str, float]:
    with torch.no_grad(), torch.autocast(batch.packed_text_ids.device.type, torch.bfloat16, enabled=autocast):
        out = model(batch)
    return {
        "ce_logits": max_err(out.ce_logits, ref["ce_logits"]),
        "mse_pred": max_err(out.mse_pred, ref["mse_pred"]),
        "llm_final_hidden": max_err(out.hidden, ref["llm_final_hidden"]),
    }


def scenario_errors(engine, name: str, ref: dict, layout: dict, inputs: dict) -> dict[str, float]:
    """tests/test_inference_reference.py's scenario A (text prompt, text CFG, global renorm) or B (VAE + ViT image
    and prompt, text + image CFG, text_channel renorm): greedy logits, one velocity, 4 Euler steps, decoded image."""
    from inference.settings import FlowSettings, TextSettings

    if name == "A":
        cfg_text = engine.new_context()
        gen = cfg_text.fork()
        engine.update_text(gen, layout["A.prompt"]["text"])
        cfg_img, hw, flow = gen.fork(), (20, 16), dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_renorm_type="global")
    else:
        gen = engine.new_context()
        engine.update_vae(gen, inputs["image_img_vae_cond"])
        engine.update_vit(gen, inputs["image_img_vit"])
        cfg_text = gen.fork()
        engine.update_text(gen, "make it blue")
        cfg_img = engine.new_context()
        engine.update_text(cfg_img, "make it blue")
        hw, flow = (16, 24), dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_type="text_channel")
    out = engine.decode_text(gen.fork(), TextSettings(max_tokens=6), stop_ids=(), keep_step_logits=True)
    velocity = engine.velocity(gen, ref[f"{name}.velocity_x_t"], 0.8, *engine.latent_grid(*hw))
    settings = FlowSettings(
        height=hw[0], width=hw[1], num_timesteps=5, timestep_shift=3.0, cfg_interval=(0.0, 1.0), **flow
    )
    final = engine.generate_latent(gen, cfg_text, cfg_img, settings, x_init=ref[f"{name}.euler_x_init"])
    return {
        "greedy tokens differ": float(out.ids != ref[f"{name}.greedy_returned_sequence"][1:].tolist()),
        "greedy logits": max_err(out.step_logits, ref[f"{name}.greedy_step_logits"]),
        "velocity": max_err(velocity, ref[f"{name}.velocity_t0.8_nocfg"]),
        f"{name} final latent": max_err(final, ref[f"{name}.euler_final_latent"]),
        "decoded": max_err(engine.decode_latent(final, *hw)[None], ref[f"{name}.euler_final_decoded"]),
    }


def fp32_row(check: str, errs: dict[str, float]) -> Row:
    worst = max(errs.values())
    shown = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    return Row("parity", check, f"max abs err {shown}", f"<= {TOL_FP32:g}", judged(worst <= TOL_FP32), errs)


def bf16_row(check: str, errs: dict[str, float]) -> Row:
    official = {k: OFFICIAL_BF16[k] for k in errs if k in OFFICIAL_BF16}
    ok = errs.get("greedy tokens differ", 0) == 0 and all(errs[k] <= 2 * v for k, v in official.items())
    shown = ", ".join(f"{k} {v:.3f}" for k, v in errs.items() if k in official)
    goal = "<= 2x official bf16: " + ", ".join(f"{v:.3f}" for v in official.values())
    return Row("parity", check, f"spread {shown}", goal, judged(ok), errs)


def section_parity(run: Run) -> Iterator[Row]:
    from safetensors.torch import load_file

    from inference.engine import Engine

    tiny = Path(run.args.reference) / "tiny"
    if not tiny.is_dir():
        raise FileNotFoundError(f"--reference {run.args.reference}: no tiny/ reference data there")
    inputs, outputs = load_file(str(tiny / "inputs.safetensors")), load_file(str(tiny / "outputs.safetensors"))
    infer_ref = load_file(str(tiny / "inference_outputs.safetensors"))
    layout = json.loads((tiny / "inference.json").read_text())
    batch = PackedBatch.from_reference(inputs).to(run.device)
    with exact_fp32():
        model = Bagel.from_pretrained(tiny, device=run.device).eval()
        for backend in ("sdpa", "flex"):
            model.set_attn_backend(backend)
            yield fp32_row(f"training forward, fp32, {backend}", training_forward_errors(model, batch, outputs, False))
        model.set_attn_backend("sdpa")
        with torch.no_grad():
            seqlens = inputs["vit_token_seqlens"].to(run.device)
            cu = torch.nn.functional.pad(torch.cumsum(seqlens, 0), (1, 0)).to(torch.int32)
            vit = model.vit_model(
                inputs["packed_vit_tokens"].to(run.device),
                inputs["packed_vit_position_ids"].to(run.device),
                cu,
                int(seqlens.max()),
            )
            images = inputs["padded_images"].to(run.device)
            yield fp32_row(
                "SigLIP + VAE encode / decode, fp32",
                {
                    "vit_post_layernorm": max_err(vit, outputs["vit_post_layernorm"]),
                    "vae encode": max_err(model.vae.encode(images), outputs["vae_encode_mean_scaled"]),
                    "vae decode": max_err(
                        model.vae.decode(inputs["padded_latent"].to(run.device)), outputs["vae_decode_of_mean_scaled"]
                    ),
                },
            )
        engine = Engine(model, ByteTokenizer())
        for name in ("A", "B"):
            yield fp32_row(f"inference scenario {name}, fp32", scenario_errors(engine, name, infer_ref, layout, inputs))
    for backend in ("sdpa", "flex"):
        model.set_attn_backend(backend)
        yield bf16_row(
            f"training forward, bf16 autocast, {backend}", training_forward_errors(model, batch, outputs, True)
        )
    engine = Engine(Bagel.from_pretrained(tiny, dtype=torch.bfloat16, device=run.device), ByteTokenizer())
    for name in ("A", "B"):
        yield bf16_row(
            f"inference scenario {name}, bf16 weights", scenario_errors(engine, name, infer_ref, layout, inputs)
        )


# ---- 2. training step ---------------------------------------------------------------------------------------


def section_train(run: Run) -> Iterator[Row]:
    from training.metrics import peak_tflops, training_flops
    from training.trainer import Trainer

    matmul = run.matmul_tflops()
    yield Row("train", "plain bf16 matmul (same run)", f"{matmul:.1f} TFLOP/s", data={"tflops": matmul})
    peak = peak_tflops(run.device) or H100_BF16_TFLOPS
    layers = run.args.train_layers
    mcfg = model_config(run, layers)
    trainer = None
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in run.args.train_tokens:
            cfg = training_config(run, tokens, tmp)
            pack, row = psir_pack(run, cfg, mcfg, "train")
            batch = pack.batch
            yield row
            row, _ = block_mask_row(run, "train", AttentionSpec(batch.sample_lens, batch.split_lens, batch.attn_modes))
            yield row
            if trainer is None:  # one model for every pack length
                trainer = Trainer(cfg).prepare(build_model(run, mcfg))
            run.free()
            times, metrics = time_steps(run, trainer, pack)
            t = statistics.median(times)
            flops = training_flops(batch, mcfg)
            achieved = flops / t / 1e12
            where = f"{shapes_note(run, layers)}, bf16 autocast, {trainer.model.language_model.model.attn_backend}, AC"
            yield Row(
                "train",
                f"train step, {batch.sequence_length} tokens ({where})",
                f"{t:.3f} s/step (median of {len(times)}), {batch.sequence_length / t:.0f} tokens/s; "
                f"loss {metrics['loss']:.3f}, grad norm {metrics['grad_norm']:.3g}",
                status=judged(math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])),
                data={"step_s": times, "metrics": metrics},
            )
            yield Row(
                "train",
                "achieved model TFLOP/s",
                f"{achieved:.3g} TFLOP/s = {flops:.3g} FLOP/step (6 N P_active + 6 N_ce H V + 12 L H sum(n^2); "
                "recompute not counted) / step time",
                data={"flops": flops, "tflops": achieved},
            )
            goal = None if run.smoke else achieved / peak >= GOAL_MFU
            yield Row(
                "train",
                f"MFU vs {peak:.0f} TFLOP/s dense bf16 spec",
                f"{achieved / peak:.1%}",
                f">= {GOAL_MFU:.0%}",
                judged(goal),
                {"mfu": achieved / peak},
            )
            yield Row(
                "train",
                f"MFU vs the measured bf16 matmul ({matmul:.0f} TFLOP/s)",
                f"{achieved / matmul:.1%}",
                data={"mfu_matmul": achieved / matmul},
            )
            yield memory_row(run, cfg, mcfg, batch)


def time_steps(run: Run, trainer, pack) -> tuple[list[float], dict]:
    """Seconds of the timed `train_step`s (after the warm-up ones) and the last step's metrics."""
    times, metrics = [], {}
    for i in range(run.args.train_warmup + run.args.train_steps):
        step = run.seconds(lambda: metrics.update(trainer.train_step([pack])))
        if i >= run.args.train_warmup:
            times.append(step)
            if run.left() < 3 * step + 15:  # keep time for the rows after the loop
                break
    return times, metrics


def memory_row(run: Run, cfg, mcfg: BagelConfig, batch: PackedBatch) -> Row:
    from training.memory import ActivationShape, estimate_for_config

    at_batch = estimate_for_config(cfg, mcfg, 1, run.device.type, ActivationShape.of_batch(batch))
    assumed = estimate_for_config(cfg, mcfg, 1, run.device.type)  # what --dry-run assumes from the config
    data = {"estimate_batch": asdict(at_batch), "estimate_assumed": asdict(assumed)}
    text = f"estimate {gib(at_batch.total):.2f} GiB at this batch's shape, {gib(assumed.total):.2f} GiB as --dry-run"
    if not run.cuda:
        return Row(
            "train",
            "peak memory vs dry-run estimate",
            f"{text}; measured: no allocator stats on CPU",
            f"within {GOAL_MEMORY:.0%}",
            "skipped",
            data,
        )
    measured = torch.cuda.max_memory_allocated(run.device)
    data.update(measured=measured, reserved=torch.cuda.max_memory_reserved(run.device))
    ratio = at_batch.total / measured - 1
    return Row(
        "train",
        "peak memory vs dry-run estimate",
        f"measured {gib(measured):.2f} GiB (reserved {gib(data['reserved']):.2f}); {text} "
        f"({ratio:+.1%} / {assumed.total / measured - 1:+.1%})",
        f"within {GOAL_MEMORY:.0%}",
        judged(abs(ratio) <= GOAL_MEMORY),
        data,
    )


# ---- 3. FlexAttention vs SDPA ----------------------------------------------------------------------------------


def section_attention(run: Run) -> Iterator[Row]:
    mcfg = model_config(run, 1)
    llm = mcfg.llm
    with tempfile.TemporaryDirectory() as tmp:
        pack, row = psir_pack(run, training_config(run, run.args.attn_tokens, tmp), mcfg, "attention")
    batch = pack.batch
    yield row
    spec = AttentionSpec(batch.sample_lens, batch.split_lens, batch.attn_modes)
    row, flex = block_mask_row(run, "attention", spec)
    yield row
    masks = {"flex": flex, "sdpa": prepare_mask(spec, "sdpa", run.device)}
    n, gen = batch.sequence_length, torch.Generator(run.device).manual_seed(0)
    shapes = [(n, llm.num_attention_heads, llm.head_dim)] + 2 * [(n, llm.num_key_value_heads, llm.head_dim)]
    qkv = [torch.randn(s, device=run.device, generator=gen) for s in shapes]
    grad_out = torch.randn(shapes[0], device=run.device, generator=gen)
    backward = run.cuda  # FlexAttention has no CPU backward

    def forward_backward(backend: str, dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [t.to(dtype).requires_grad_(backward) for t in qkv]
        out = attend(*leaves, masks[backend])
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype)) if backward else []
        return out.detach(), grads

    (o_flex, g_flex), (o_sdpa, g_sdpa) = (
        forward_backward("flex", torch.float32),
        forward_backward("sdpa", torch.float32),
    )
    out_err = max_err(o_flex, o_sdpa)
    where = f"{n} tokens, {llm.num_attention_heads} / {llm.num_key_value_heads} heads x {llm.head_dim}"
    yield Row(
        "attention",
        f"flex vs sdpa output, fp32 ({where})",
        f"max abs diff {out_err:.1e}",
        f"<= {TOL_FP32:g}",
        judged(out_err <= TOL_FP32),
        {"out": out_err},
    )
    if backward:
        grad_err = {k: max_err(a, b) for k, a, b in zip("qkv", g_flex, g_sdpa, strict=True)}
        yield Row(
            "attention",
            "flex vs sdpa gradients dq / dk / dv, fp32",
            "max abs diff " + ", ".join(f"d{k} {v:.1e}" for k, v in grad_err.items()),
            f"<= {TOL_FP32:g}",
            judged(max(grad_err.values()) <= TOL_FP32),
            grad_err,
        )
    else:
        yield Row(
            "attention",
            "flex vs sdpa gradients",
            f"not compared: FlexAttention has no backward on {run.device.type} (torch {torch.__version__})",
            status="skipped",
        )
    times = {b: run.median_seconds(lambda b=b: forward_backward(b, torch.bfloat16), repeat=5) for b in masks}
    bf16_err = max_err(forward_backward("flex", torch.bfloat16)[0], forward_backward("sdpa", torch.bfloat16)[0])
    what = "forward + backward" if backward else "forward"
    yield Row(
        "attention",
        f"time, bf16, {what}",
        f"flex {times['flex'] * 1e3:.1f} ms, sdpa (dense per-sample masks) {times['sdpa'] * 1e3:.1f} ms "
        f"(sdpa / flex time {times['sdpa'] / times['flex']:.2f}); bf16 outputs differ by {bf16_err:.1e}",
        data={"seconds": times, "bf16_out_diff": bf16_err},
    )


# ---- 4. inference -----------------------------------------------------------------------------------------------


def section_inference(run: Run) -> Iterator[Row]:
    from benchmarks.kv_cache import prefill
    from inference.engine import Engine, FlowTrace
    from inference.settings import FlowSettings, TextSettings

    layers = run.args.train_layers
    mcfg = model_config(run, layers)
    engine = Engine(build_model(run, mcfg, torch.bfloat16, vae=False), run.tokenizer)
    note = f"{shapes_note(run, layers)}, bf16, sdpa"
    decode = TextSettings(max_tokens=run.args.decode_tokens)
    for context in run.args.contexts:
        ctx = engine.new_context()
        fill = run.seconds(lambda ctx=ctx, context=context: prefill(engine, ctx, context))
        engine.decode_text(ctx.fork(), TextSettings(max_tokens=4), stop_ids=())  # warm-up
        t = run.seconds(lambda ctx=ctx: engine.decode_text(ctx, decode, stop_ids=()))  # appends in place
        yield Row(
            "inference",
            f"decode at {context} context ({note})",
            f"{decode.max_tokens / t:.1f} tokens/s ({t / decode.max_tokens * 1e3:.1f} ms/token, greedy, "
            f"{decode.max_tokens} tokens); prefill {context / fill:.0f} tokens/s",
            data={"tokens_per_s": decode.max_tokens / t, "prefill_s": fill},
        )
        del ctx
    side = min(run.args.image_size, engine.max_image_side)
    gen = engine.new_context()
    prefill(engine, gen, run.args.contexts[0])  # the prompt and earlier turns
    cfg_text, cfg_img = engine.new_context(), gen.fork()
    settings = FlowSettings(
        height=side, width=side, num_timesteps=2, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)
    )  # one Euler step, all 3 branches
    trace = FlowTrace()
    t = run.median_seconds(lambda: engine.generate_latent(gen, cfg_text, cfg_img, settings, trace=trace), repeat=3)
    branches = len(trace.branches[-1])
    tokens = (side // mcfg.latent_downsample) ** 2
    yield Row(
        "inference",
        f"one flow step, {side}x{side} image ({tokens} latent tokens), CFG ({note})",
        f"{t * 1e3:.0f} ms/step for {branches} branches ({t / branches * 1e3:.0f} ms each) after a "
        f"{run.args.contexts[0]}-token context",
        "3 branches",
        judged(branches == 3),
        {"step_s": t, "branches": branches},
    )


SECTIONS = {
    "parity": section_parity,
    "train": section_train,
    "attention": section_attention,
    "inference": section_inference,
}
