"""Peak host memory (RSS) per rank while loading a pretrained checkpoint for FSDP training, and while exporting.

    OMP_NUM_THREADS=1 python benchmarks/load_rss.py                          # ~0.5B params, fp32 file, 2 and 4 ranks
    OMP_NUM_THREADS=1 python benchmarks/load_rss.py --dtype bf16 --world 2   # the release's dtype
    OMP_NUM_THREADS=1 python benchmarks/load_rss.py --code OLD_CHECKOUT --modes replicated
                                                                             # "before": another checkout's code

Each row is a fresh `torchrun --standalone` (gloo, CPU) whose ranks build the model as the trainer does:
  replicated  `Bagel.from_pretrained(path)` on every rank, then `prepare_model` (FSDP shards it): the trainer
              before sharded loading (with its code: `--code`), or today's none / zero2 path
  sharded     `training.loading.build_model` (meta skeleton) + `prepare_model` (FSDP, then each rank reads only
              its shards' slices from the file)
Per rank: RSS after imports and the process group (the framework's share), and the peak resident
set (VmHWM: anonymous memory plus the memory-mapped file pages touched). The goal line is model / world + largest
tensor (float32, as trained on CPU) + the VAE (replicated) + that framework RSS. The `export` row: `export_ema` (of
`--code`) in one fresh process on a training checkpoint (model + EMA shards of 2 sharded ranks, written once with
this checkout's code), peak RSS of that process; its goal is the framework RSS + one float32 tensor read + its cast.

Memory: the checkpoint (written once to --dir, reused) is 2 GB at fp32; a replicated 4-rank run holds ~4 x 4 GB
of RSS (each rank's copy plus the shared page cache of the file), so run it on a machine with ~12 GB free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_now() -> int:
    return _status_kib("VmRSS") * 1024


def rss_peak() -> int:
    """VmHWM: the peak resident set of this process image. (Not ru_maxrss: Linux carries a parent's peak into a
    forked-and-exec'd child's ru_maxrss.)"""
    return _status_kib("VmHWM") * 1024


def bench_config():
    """~0.49B Bagel parameters: an MoT LLM of 18 layers (hidden 1024, vocab 32768), a small ViT and VAE."""
    from bagel_ft.config import BagelArchConfig, BagelConfig, LLMConfig, VAEConfig, ViTConfig

    return BagelConfig(
        llm=LLMConfig(
            vocab_size=32768,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=18,
            num_attention_heads=16,
            num_key_value_heads=4,
        ),
        vit=ViTConfig(
            hidden_size=384, intermediate_size=1536, num_hidden_layers=7, num_attention_heads=6, image_size=224
        ),
        vae=VAEConfig(ch=64),
        arch=BagelArchConfig(max_latent_size=32, vit_max_num_patch_per_side=16),
    )


def write_checkpoint(path: Path, dtype: str) -> None:
    import torch

    from bagel_ft.autoencoder import AutoEncoder
    from bagel_ft.modeling import Bagel

    torch.manual_seed(0)
    cfg = bench_config()
    Bagel(cfg).attach_vae(AutoEncoder(cfg.vae)).save_pretrained(path, dtype=getattr(torch, dtype))


def train_overrides(ckpt: Path, run: Path) -> list[str]:
    return [
        "model.init=pretrained",
        f"model.path={ckpt}",
        "model.tokenizer=byte",
        "train.sharding=fsdp",
        "train.device=cpu",
        "train.dtype=fp32",
        f"run.dir={run}",
        "data.sources=[{path: unused}]",
    ]


# ---- inside the measured processes --------------------------------------------------------------------------


def worker(args) -> None:
    """One rank of a torchrun: load (mode replicated | sharded), report, optionally save a training checkpoint."""
    import torch

    from bagel_ft.modeling import Bagel
    from training.config import load_config
    from training.parallelize import init_distributed, prepare_model

    torch.set_num_threads(1)
    cfg = load_config(None, train_overrides(Path(args.ckpt), Path(args.run)))
    env = init_distributed("cpu")
    before = rss_now()
    t0 = time.perf_counter()
    if args.worker == "replicated":
        model = prepare_model(Bagel.from_pretrained(args.ckpt), cfg, env)
    else:
        from training.loading import build_model

        model = prepare_model(build_model(cfg, env.device), cfg, env)
    seconds = time.perf_counter() - t0
    row = {"rank": env.rank, "rss_before": before, "peak": rss_peak(), "seconds": seconds}
    Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(row))
    if args.save:  # a training checkpoint (model + EMA shards) for the export rows
        from training import checkpoint as ckpt
        from training.optim import EMA, build_optimizer

        ema = EMA(model, 0.9)
        meta = {"ema_keys": sorted(ema.shadow)}
        ckpt.save_checkpoint(
            Path(args.run) / "checkpoints", 1, model, build_optimizer(model, cfg.optim), ema, {}, meta, env, 1
        )


def export_worker(args) -> None:
    import torch

    from training import checkpoint as ckpt
    from training.config import load_config
    from training.export import export_ema

    torch.set_num_threads(1)
    cfg = load_config(None, train_overrides(Path(args.ckpt), Path(args.run)))
    before = rss_now()
    t0 = time.perf_counter()
    export_ema(cfg, ckpt.latest_checkpoint(Path(args.run) / "checkpoints"), Path(args.out) / "export")
    row = {"rank": 0, "rss_before": before, "peak": rss_peak(), "seconds": time.perf_counter() - t0}
    Path(args.out, "rank0.json").write_text(json.dumps(row))


# ---- the driver ----------------------------------------------------------------------------------------------


def run(cmd: list[str], code: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def measure(mode: str, world: int, ckpt: Path, run_dir: Path, code: Path, save: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
        cmd += [str(Path(__file__).resolve()), "--worker", mode, "--ckpt", str(ckpt), "--run-dir", str(run_dir)]
        run(cmd + ["--out", out] + (["--save"] if save else []), code)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def measure_export(ckpt: Path, run_dir: Path, code: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "export", "--ckpt", str(ckpt)]
        run(cmd + ["--run-dir", str(run_dir), "--out", out], code)
        return json.loads(Path(out, "rank0.json").read_text())


def sizes() -> tuple[int, int, int]:
    """(Bagel parameters, largest tensor's elements, VAE parameters) of the benchmark config."""
    import torch

    from bagel_ft.autoencoder import AutoEncoder
    from bagel_ft.modeling import Bagel

    with torch.device("meta"):
        model, vae = Bagel(bench_config()), AutoEncoder(bench_config().vae)
    params = list(model.parameters())
    return sum(p.numel() for p in params), max(p.numel() for p in params), sum(p.numel() for p in vae.parameters())


def estimated(ckpt: Path, mode: str, world: int, dtype: str, code: Path, what: str) -> str:
    """`bagel-ft train --dry-run`'s host RAM estimate (GiB) of this row (replicated: sharding 'none''s formula),
    for this checkout's code only."""
    if code != ROOT:
        return "-"
    from training.config import load_config
    from training.memory import host_estimate

    cfg = load_config(None, train_overrides(ckpt, ckpt) + ([] if mode == "sharded" else ["train.sharding=none"]))
    f = 2 if dtype == "bfloat16" else 4  # the export's dtype is the file's too (export.dtype auto)
    return f"{getattr(host_estimate(cfg, bench_config(), world, 'cpu', f, f), what) / GiB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="ranks per run")
    parser.add_argument("--modes", nargs="+", default=["replicated", "sharded"], choices=["replicated", "sharded"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the checkpoint file's")
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "bagel_ft_load_rss"), help="work dir")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose code the ranks run (e.g. an older one)")
    parser.add_argument("--no-export", action="store_true", help="skip the export row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", dest="run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "write":
        return write_checkpoint(Path(args.ckpt), args.out)
    if args.worker == "export":
        return export_worker(args)
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT))
    work = Path(args.dir)
    ckpt = work / f"ckpt-{args.dtype}"
    if not (ckpt / "ema.safetensors").is_file():  # in a child: this driver stays small (its children fork from it)
        code_run = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "write",
            "--ckpt",
            str(ckpt),
            "--out",
            args.dtype,
        ]
        run(code_run, ROOT)
    code = Path(args.code).resolve()
    params, largest, vae = sizes()
    file_gib = (ckpt / "ema.safetensors").stat().st_size / GiB
    print(
        f"Bagel {params / 1e9:.3f}B parameters ({4 * params / GiB:.2f} GiB fp32; file {args.dtype} {file_gib:.2f} "
        f"GiB), largest tensor {4 * largest / GiB:.3f} GiB fp32, VAE {4 * vae / GiB:.3f} GiB; code: {code}\n"
    )
    print(
        "| mode | ranks | RSS before load (GiB) | peak RSS per rank (GiB), max | peak − before | dry-run estimate "
        "| goal | load (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        for world in args.world:
            rows = measure(mode, world, ckpt, work / f"run-{mode}-{world}", code)
            before = max(r["rss_before"] for r in rows)
            peak = max(r["peak"] for r in rows)
            goal = 4 * params / world + 4 * largest + 4 * vae + before
            seconds = max(r["seconds"] for r in rows)
            print(
                f"| {mode} | {world} | {before / GiB:.2f} | {peak / GiB:.2f} | {(peak - before) / GiB:.2f} | "
                f"{estimated(ckpt, mode, world, args.dtype, code, 'loading')} | {goal / GiB:.2f} | {seconds:.1f} |"
            )
    if args.no_export:
        return
    trained = work / f"run-export-{args.dtype}"
    if not (trained / "checkpoints").is_dir():  # a training checkpoint, written once by this checkout
        measure("sharded", 2, ckpt, trained, ROOT, save=True)
    row = measure_export(ckpt, trained, code)
    before = row["rss_before"]
    print(
        f"| export (one process) | 1 | {before / GiB:.2f} | {row['peak'] / GiB:.2f} | "
        f"{(row['peak'] - before) / GiB:.2f} | {estimated(ckpt, 'sharded', 1, args.dtype, code, 'export')} | "
        f"{(2 * 4 * largest + before) / GiB:.2f} | {row['seconds']:.1f} |"
    )


if __name__ == "__main__":
    main()
