"""Synthesize training data in the PSIR trajectory format (docs/format.md): three pipelines and a merge.

  trajectories  prompt -> scene graph -> plan -> draw each step -> judge each step; keep consistent ones
  critiques     the drafter's own trajectory judged step by step; verdict, analysis, fix, corrected image
  alignment     (image, instruction) pairs, 1 positive : 2 negatives (perturbed image or instruction)

Offline by default: with no endpoint configured every part is the shapes world, and prompts come from its
grammar when no --prompts file is given. A config points the extractor / judge at an OpenAI-compatible
server (the key is read from the env var it names). Re-running the same command resumes: finished chunks
are skipped and every model call is cached, so no paid call repeats. A reply still invalid after its repair
re-asks rejects its prompt for this run only: a re-run asks again.

Progress: a bar on a terminal, else a line on stderr every --progress-every seconds (done / total, rate,
ETA, requests, retries, tokens, estimated cost). Ctrl-C stops cleanly: the requests in flight finish, the
summary is printed; a re-run resumes. Budgets (over all runs of the shard): --max-requests N and --max-cost
USD (priced by `run.prices` in the config, e.g. configs/data/gpt4o.yaml); raise one and re-run to continue.

Exit status: 0 done; 1 stopped by an error (bad key, model, quota); 2 bad arguments; 3 some prompts failed
(transient errors outlived the retries): re-run to retry them; 4 a budget was reached; 130 Ctrl-C; 143 SIGTERM.

  # 200 prompts of each subset, offline on a CPU (under a minute each)
  bagel-ft data trajectories --out runs/data/traj --num 200
  bagel-ft data critiques    --out runs/data/crit --num 200
  bagel-ft data alignment    --out runs/data/align --num 200

  # GPT-4o as extractor + judge over your prompts, 4 machines, 32 requests in flight each
  OPENAI_API_KEY=... bagel-ft data trajectories --config configs/data/gpt4o.yaml --prompts prompts.txt \\
      --out runs/data/traj-s0 --shard 0/4 --concurrency 32
  bagel-ft data merge --out runs/data/traj runs/data/traj-s0 runs/data/traj-s1 runs/data/traj-s2 runs/data/traj-s3

  # critiques of a checkpoint's own PSIR trajectories (judge: shapes world; corrections: its renderer),
  # one process per GPU, each loading the checkpoint once
  CUDA_VISIBLE_DEVICES=0 bagel-ft data critiques --config configs/data/critiques_from_ckpt.yaml \\
      --set model_sampler.ckpt=runs/ft/ckpt --num 1000 --out runs/data/crit-s0 --shard 0/2 &
  CUDA_VISIBLE_DEVICES=1 bagel-ft data critiques --config configs/data/critiques_from_ckpt.yaml \\
      --set model_sampler.ckpt=runs/ft/ckpt --num 1000 --out runs/data/crit-s1 --shard 1/2

  # a cluster job: progress lines every 5 minutes, at most $50 of API calls for this shard
  bagel-ft data trajectories --config configs/data/gpt4o.yaml --prompts prompts.txt --out runs/data/traj \\
      --max-cost 50 --progress-every 300 > traj.log 2>&1

  # any config field from the command line
  bagel-ft data trajectories --out runs/data/t --num 20 --set pipeline.image_size=256 --set pipeline.max_steps=4

Output: OUT/part-*.parquet (rows: bagel_ft.trajectory.datasets_features()), OUT/manifest-*.sqlite,
OUT/summary-*.json, OUT/config.yaml, OUT/cache/calls.sqlite (an earlier version's per-file cache and JSON
manifest are moved into these on the next run). `merge` writes OUT/data-*.parquet, one row per record id;
load with datasets.load_dataset("parquet", data_files="OUT/data-*.parquet").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from commands.options import add_set_argument

PIPELINES = ("trajectories", "critiques", "alignment")
PIPELINE_HELP = {
    "trajectories": "build the trajectories subset: prompt -> scene graph -> plan -> draw, judge each step",
    "critiques": "build the critiques subset: a drafter's trajectory judged step by step, with the fix",
    "alignment": "build the alignment subset: (image, instruction) pairs, 1 positive : 2 negatives",
}


def _examples(name: str) -> str:
    """The module docstring's example lines for pipeline `name` (its own --help shows them)."""
    lines = [line for line in (__doc__ or "").splitlines() if f"bagel-ft data {name}" in line]
    return "examples:\n" + "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="PIPELINE", required=True)
    for name in PIPELINES:
        p = sub.add_parser(name, help=PIPELINE_HELP[name], description=f"{PIPELINE_HELP[name]}.\n\n{_examples(name)}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.add_argument("--out", required=True, help="output directory (re-run with the same one to resume)")
        p.add_argument(
            "--num",
            type=int,
            default=None,
            help="use the first NUM distinct prompts (required without --prompts: prompts to generate)",
        )
        p.add_argument(
            "--prompts", default=None, help="prompt file: one per line (.txt) or JSON lines with 'prompt' (.jsonl)"
        )
        p.add_argument(
            "--config", default=None, help="YAML data config, e.g. configs/data/gpt4o.yaml (default: shapes world)"
        )
        add_set_argument(p, "pipeline.image_size=256")
        p.add_argument("--shard", default="0/1", help="I/N: this run does the prompts whose hash is I mod N")
        p.add_argument("--concurrency", type=int, default=None, help="requests in flight (endpoint.concurrency)")
        p.add_argument("--seed", type=int, default=0, help="run seed: generated prompts and every per-prompt seed")
        p.add_argument(
            "--cache", default=None, help="call cache directory (default OUT/cache); share it between runs of a machine"
        )
        p.add_argument("--max-requests", type=int, default=None, help="stop at N HTTP requests (run.max_requests)")
        p.add_argument("--max-cost", type=float, default=None, help="stop at an estimated USD spend (run.max_cost)")
        p.add_argument(
            "--progress-every", type=float, default=None, help="seconds between progress lines without a terminal"
        )
        p.set_defaults(_data_run=_run_pipeline)
    m = sub.add_parser("merge", help="merge run / shard directories into one deduplicated dataset")
    m.add_argument("--out", required=True, help="directory for data-*.parquet and summary.json")
    m.add_argument("dirs", nargs="+", metavar="SHARD_DIR", help="output directories of runs / shards")
    m.add_argument("--allow-partial", action="store_true", help="merge shards that have not finished (or had failures)")
    m.set_defaults(_data_run=_run_merge)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args._data_run(args)


def _run_pipeline(args: argparse.Namespace) -> int:
    from common.endpoint import MissingAPIKey
    from data_gen import alignment, critiques, trajectories
    from data_gen.config import ConfigError, load_config
    from data_gen.errors import FatalError
    from data_gen.runner import read_prompts, run_pipeline, shapes_prompts
    from data_gen.shards import parse_shard

    module = {"trajectories": trajectories, "critiques": critiques, "alignment": alignment}[args.data_command]
    try:
        overrides = list(args.set)
        if args.concurrency is not None:
            overrides.append(f"endpoint.concurrency={args.concurrency}")
        if args.cache:
            overrides.append(f"cache_dir={args.cache}")
        for flag, key in (
            ("max_requests", "max_requests"),
            ("max_cost", "max_cost"),
            ("progress_every", "progress_every_s"),
        ):
            if getattr(args, flag) is not None:
                overrides.append(f"run.{key}={getattr(args, flag)}")
        cfg = load_config(args.config, overrides)
        shard = parse_shard(args.shard)
    except (ConfigError, ValueError) as e:
        print(f"bagel-ft data: {e}", file=sys.stderr)
        return 2
    if args.num is not None and args.num < 1:
        raise SystemExit(f"--num: expected a count >= 1, got {args.num}")
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.num is None:
        print("bagel-ft data: give --prompts FILE or --num N (prompts generated by the shapes world)", file=sys.stderr)
        return 2
    else:
        prompts = shapes_prompts(args.num, args.seed, cfg.shapes.categories)
    try:
        result = asyncio.run(
            run_pipeline(
                module.NAME,
                module.build,
                cfg,
                prompts,
                args.out,
                num=args.num,
                shard=shard,
                seed=args.seed,
                with_sampler=module is critiques,
            )
        )
    except (FatalError, ConfigError, MissingAPIKey) as e:
        print(f"bagel-ft data: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: quit at once (the cache and the finished chunks are safe)
        print("bagel-ft data: quit; re-run the same command to resume", file=sys.stderr)
        return 130
    if result.stopped:
        print(f"bagel-ft data: stopped ({result.stopped}); re-run the same command to resume", file=sys.stderr)
        return {"interrupted": 130, "terminated": 143}.get(result.stopped, 4)
    return 0 if result.complete else 3


def _run_merge(args: argparse.Namespace) -> int:
    from data_gen.shards import merge, read_manifests, save_dataset
    from data_gen.summary import Summary

    try:
        ds = merge(args.dirs, allow_partial=args.allow_partial)
    except (FileNotFoundError, ValueError) as e:
        print(f"bagel-ft data merge: {e}", file=sys.stderr)
        return 2
    files = save_dataset(ds, args.out)
    total = Summary()
    for d in args.dirs:
        for manifest in read_manifests(d, allow_partial=True):
            for entry in manifest["chunks"].values():
                total.add(entry["counters"])
    labels = {}
    for subset, label in zip(ds["subset"], ds["label"], strict=True):
        labels[f"{subset}/{label or '-'}"] = labels.get(f"{subset}/{label or '-'}", 0) + 1
    summary = {
        "records": len(ds),
        "files": [f.name for f in files],
        "by_subset_label": labels,
        "sources": [str(d) for d in args.dirs],
        "totals": total.to_dict(),
    }
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"merged {len(ds)} records ({labels}) into {len(files)} file(s) in {args.out}")
    return 0


if __name__ == "__main__":  # `python -m commands.data ...` == `bagel-ft data ...`
    from commands.main import main

    sys.exit(main(["data", *sys.argv[1:]]))
