"""Fine-tune a Bagel model on trajectory tables (CE on text + flow-matching MSE on images).

  bagel-ft train configs/train/tiny_cpu.yaml                          # CPU, tiny model, ~1 min
  bagel-ft train configs/train/tiny_cpu.yaml train.steps=50 optim.lr=1e-3 run.dir=runs/try
  bagel-ft train configs/train/psir_bagel7b_8xh100.yaml --dry-run --world-size 8   # memory estimate only
  torchrun --nproc_per_node 8 -m training.cli configs/train/psir_bagel7b_8xh100.yaml
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id run \
      -m training.cli configs/train/psir_bagel7b_8xh100.yaml train.global_batch=16    # on each node
  bagel-ft train RUN/config.yaml --export RUN/checkpoints/step_00010000 OUT     # EMA -> official layout
  bagel-ft train --help-config                                        # every config key with its doc

A run resumes automatically from the latest complete checkpoint in run.dir (run.resume=auto).
Exit codes: 0 done, 1 bad config / does not fit, 2 stopped (non-finite steps).
"""

from __future__ import annotations

import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="training config YAML (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE, e.g. optim.lr=1e-4 train.steps=100")
    parser.add_argument("--dry-run", action="store_true", help="print the per-device memory estimate and exit")
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="processes to estimate for with --dry-run (default: $WORLD_SIZE or 1)",
    )
    parser.add_argument(
        "--export",
        nargs=2,
        metavar=("CHECKPOINT", "OUT"),
        help="export a checkpoint's EMA weights in the official layout and exit",
    )
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and doc")


def run(args) -> int:
    from bagel_ft.config import ConfigError
    from training.config import describe, load_config

    if args.help_config:
        print("\n".join(describe()))
        return 0
    if not args.config:
        print("bagel-ft train: a CONFIG file is required (see configs/train/)", file=sys.stderr)
        return 1
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
        if args.export:
            from training.export import export_ema

            print(export_ema(cfg, args.export[0], args.export[1]))
            return 0
        from training.memory import MemoryFitError
        from training.trainer import TrainingStopped, train

        try:
            state = train(cfg)
        except TrainingStopped as e:
            print(f"bagel-ft train: {e}", file=sys.stderr)
            return 2
        except MemoryFitError as e:
            print(f"bagel-ft train: {e}", file=sys.stderr)
            return 1
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"done: {state.step} steps, checkpoints in {cfg.run.dir}/checkpoints", file=sys.stderr)
        return 0
    except ConfigError as e:
        print(f"bagel-ft train: {e}", file=sys.stderr)
        return 1


def dry_run(cfg, world: int) -> int:
    """Estimate per-device memory without loading weights; exit 1 when it cannot fit."""
    import torch

    from training.config import resolve_grad_accum
    from training.memory import GiB, MemoryFitError, check_fit, estimate_for_config
    from training.trainer import check_geometry, model_config

    mcfg = model_config(cfg)
    check_geometry(cfg, mcfg)
    accum = resolve_grad_accum(cfg, world)
    gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    est = estimate_for_config(cfg, mcfg, world, "cuda" if gpu else "cpu")
    where = (
        f"{world} process(es) x {accum} pack(s) per step, sharding={cfg.train.sharding}, activation_checkpointing="
        f"{cfg.train.activation_checkpointing}, tokens/pack={cfg.data.max_num_tokens}, device={'cuda' if gpu else 'cpu'}"
    )
    print(est.table(f"per-device memory estimate ({where})"))
    print(host_table(cfg, mcfg, world, "cuda" if gpu else "cpu"))
    try:
        check_fit(est, cfg, torch.device("cuda" if gpu else "cpu"))
    except MemoryFitError as e:
        print(f"bagel-ft train --dry-run: {e}", file=sys.stderr)
        return 1
    if gpu and cfg.train.gpu_memory_gb > 0:
        print(f"fits: {est.total / GiB:.1f} GiB <= 90% of {cfg.train.gpu_memory_gb:.0f} GiB")
    return 0


def host_table(cfg, mcfg, world: int, device_type: str) -> str:
    """The host RAM table; the checkpoint's dtype from its file headers when model.path has weights (else bf16)."""
    import torch

    from bagel_ft.checkpoint import CheckpointError, model_weights
    from training.export import EXPORT_DTYPES
    from training.memory import host_estimate

    file_bytes, source = (2, "bf16 assumed") if cfg.model.init == "pretrained" else (4, "none: model.init=random")
    if cfg.model.init == "pretrained":
        try:
            dtype = model_weights(cfg.model.path).dtype()
            file_bytes, source = dtype.itemsize, f"{str(dtype).removeprefix('torch.')} ({cfg.model.path})"
        except CheckpointError:
            pass
    auto = torch.float32 if cfg.model.init == "random" else None
    export = EXPORT_DTYPES.get(cfg.export.dtype) or auto
    export_bytes = export.itemsize if export else file_bytes
    host = host_estimate(cfg, mcfg, world, device_type, file_bytes, export_bytes)
    return host.table(f"host RAM per rank (checkpoint file {source}, export {export_bytes} bytes per weight)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m training.cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
