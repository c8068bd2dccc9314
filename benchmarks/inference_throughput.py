"""Inference throughput: images/s and generated tokens/s at batch 1 / 4 / 16, beside the official strategy.

Workloads (each over the same prompts and seeds, ShapesEval prompts, the model's largest image):
  single       prompt -> one image (t2i) on --ckpt (the shipped shapes base);
  psir-script  PSIR streams on --ckpt with forced turns (plan -> draw -> inspect -> refine -> draw -> stop):
               the shipped base has not learned the PSIR format (free-running, its streams end at the first
               turn), so the texts are given and the draws, image contexts and CFG contexts are the real ones;
  psir         free-running PSIR streams (sampled text; streams plan, draw and stop at different times) on
               --psir-ckpt, a checkpoint trained on PSIR streams (default: tests/assets/tiny-psir).
Strategies:
  official     the official inferencer's: every CFG branch its own forward, one after the other, on contexts
               copied per branch (deepcopy, not an O(1) fork), prompt after prompt (`OfficialStrategyEngine`);
  batch B      ours (`Generator.generate_many(batch_size=B)`): one packed forward per step for the CFG branches
               of all B samples in flight (ragged: a finished sample leaves, the next prompt joins).
Guidance: the demo draws without CFG (one forward per flow step, demo.base_model.FlowDefaults). `--cfg 4 2` sets
text / image guidance (the release's edit CFG; single mode keeps image guidance off, as the official t2i): a flow
step then has 2 branches in single mode (full, text-unconditional) and 3 in PSIR mode (full, text-unconditional,
image-unconditional), which the official strategy runs one after the other.
Rates are per CPU second of this process (1 thread: on an idle machine its wall time): the CPU here is shared,
and while other jobs run, wall time measures them too; wall seconds and the load average are printed beside.
Each row is the best of --repeats interleaved runs; ratios are within one run of the script.

    OMP_NUM_THREADS=1 python benchmarks/inference_throughput.py                      # CPU, ~10 min
    OMP_NUM_THREADS=1 python benchmarks/inference_throughput.py --cfg 4 2                             # with CFG
    OMP_NUM_THREADS=1 python benchmarks/inference_throughput.py --workloads single --prompts 16 --timesteps 11
    python benchmarks/inference_throughput.py --device cuda --dtype bf16 --ckpt CKPT_7B --psir-ckpt CKPT_7B_PSIR
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bagel_ft.trajectory import inspect_text, plan_text, refine_text  # noqa: E402
from inference.api import Generator  # noqa: E402
from inference.batching import run_batched  # noqa: E402
from inference.engine import Context, Engine  # noqa: E402
from inference.kv_cache import KVCache  # noqa: E402
from inference.psir import DRAW, STOP, TEXT, ForcedTurn, run_psir  # noqa: E402
from inference.settings import GenerateOptions  # noqa: E402

SCRIPT = [
    ForcedTurn(plan_text("draw the scene", "the shapes of the prompt"), decision=DRAW),
    ForcedTurn(inspect_text("inconsistent", "an object is missing"), decision=TEXT),
    ForcedTurn(refine_text("add the missing object"), decision=DRAW),
    ForcedTurn(inspect_text("consistent"), decision=STOP),
]


class CopiedContext(Context):
    """A context whose forks are deep copies (the official `deepcopy(gen_context)`), not O(1) forks."""

    def fork(self) -> Context:
        return CopiedContext(copy.deepcopy(self.cache), self.rope)


class OfficialStrategyEngine(Engine):
    """Our kernels driven the official inferencer's way: the ops of a step (the CFG branches) run as separate
    forwards, one after the other; contexts are copied per branch."""

    def new_context(self) -> Context:
        return CopiedContext(KVCache(self.config.llm.num_hidden_layers))

    def execute(self, ops: list) -> list:
        return [super(OfficialStrategyEngine, self).execute([op])[0] for op in ops]


def inference_options(mode: str, timesteps: int | None, cfg: tuple[float, float] | None = None) -> GenerateOptions:
    """The options every ShapesEval run of the demo uses (demo.pipeline.inference_config); `cfg` = (text, image)
    guidance scales instead of the demo's."""
    from demo.pipeline import inference_config
    from eval.generator import dataclass_from_dict

    options = dataclass_from_dict(GenerateOptions, {**inference_config()["options"], "mode": mode})
    if timesteps:
        options.flow = replace(options.flow, num_timesteps=timesteps)
    if cfg:
        image = cfg[1] if mode == "psir" else 1.0  # t2i has no image to guide against (the official t2i's 1.0)
        options.flow = replace(options.flow, cfg_text_scale=cfg[0], cfg_img_scale=image)
    return options


def run_workload(engine: Engine, workload: str, options: GenerateOptions, jobs: list, batch_size: int):
    """-> (CPU seconds, wall seconds, images, generated tokens) for every job, `batch_size` in flight."""
    generator = Generator(engine, options)
    cpu, start = time.process_time(), time.perf_counter()
    if workload == "psir-script":
        programs = (run_psir.steps(engine, p, options.psir(), s, list(SCRIPT)) for p, s in jobs)
        costs = [d.value.cost for d in run_batched(engine, programs, batch_size)]
    else:
        costs = [r.cost for _, r in generator.generate_many(jobs, batch_size=batch_size)]
    return (
        time.process_time() - cpu,
        time.perf_counter() - start,
        sum(c.images for c in costs),
        sum(c.tokens for c in costs),
    )


def _ratio(rate: float, ref: tuple | None) -> str:
    """rate / the images per CPU second of a reference row (cpu, wall, images, ...)."""
    return f"{rate / (ref[2] / ref[0]):.2f}x" if ref and ref[2] else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=str(ROOT / "checkpoints" / "shapes-base"), help="single / psir-script model")
    ap.add_argument("--psir-ckpt", default=str(ROOT / "tests" / "assets" / "tiny-psir"), help="free PSIR model")
    ap.add_argument(
        "--workloads", nargs="+", default=["single", "psir-script", "psir"], choices=("single", "psir-script", "psir")
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompts", type=int, default=32, help="ShapesEval prompts per row (every 12th of the 400)")
    ap.add_argument("--timesteps", type=int, default=None, help="schedule points (default: the demo's)")
    ap.add_argument(
        "--cfg",
        type=float,
        nargs=2,
        metavar=("TEXT", "IMAGE"),
        default=None,
        help="text and image guidance scales (default: the demo's, no guidance)",
    )
    ap.add_argument("--no-official", action="store_true", help="skip the official-strategy rows")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per row; the fastest counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from eval.shapes_eval import load_prompts

    prompts = load_prompts()
    step = max(1, len(prompts) // args.prompts)
    jobs = [(p["prompt"], 1000 * p["index"]) for p in prompts[::step][: args.prompts]]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    cfg = f"CFG text {args.cfg[0]:g} / image {args.cfg[1]:g}" if args.cfg else "the demo's flow settings (no CFG)"
    print(f"# {len(jobs)} prompts per row, {cfg}, {args.threads} thread(s), device {device}, torch {torch.__version__}")
    table = []
    for workload in args.workloads:
        ckpt = args.psir_ckpt if workload == "psir" else args.ckpt
        mode = "single" if workload == "single" else "psir"
        ours = Engine.from_pretrained(ckpt, dtype=dtype, device=args.device)
        official = OfficialStrategyEngine(ours.model, ours.tokenizer, ours.geometry)
        options = inference_options(mode, args.timesteps, args.cfg)
        if workload == "psir":
            options.text = replace(options.text, temperature=0.7, top_p=0.9)
        rows = [(f"batch {b}", ours, b) for b in args.batch_sizes] + (
            [] if args.no_official else [("official", official, 1)]
        )
        run_workload(ours, workload, options, jobs[:2], 2)  # warm-up
        results = {}
        for _ in range(args.repeats):
            for name, engine, batch in rows:
                load = os.getloadavg()[0]
                cpu, wall, images, tokens = run_workload(engine, workload, options, jobs, batch)
                print(
                    f"{workload} {name}: {cpu:.1f} CPU s, {wall:.1f} s, {images} images, {tokens} tokens, load "
                    f"{load:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
                if name not in results or cpu < results[name][0]:
                    results[name] = (cpu, wall, images, tokens, f"{load:.1f}/{os.getloadavg()[0]:.1f}")
        base, off = results.get("batch 1"), results.get("official")
        for name, (cpu, wall, images, tokens, load) in results.items():
            table.append(
                f"| {workload} | {Path(ckpt).name} | {name} | {images / cpu:.2f} | {tokens / cpu:.0f} | "
                f"{images} | {tokens} | {cpu:.1f} | {wall:.1f} | {_ratio(images / cpu, base)} | "
                f"{_ratio(images / cpu, off)} | {load} |"
            )
    print(
        "| workload | model | strategy | images/s | tokens/s | images | tokens | CPU s | wall s | vs batch 1 | "
        "vs official | load avg (before/after) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
