"""Run the whole system on the shapes world: build data, fine-tune the shipped base model with the PSIR recipe,
run the PSIR loop on held-out prompts, score base vs fine-tuned on ShapesEval, and write OUT/report.html.

  bagel-ft demo --out runs/demo                          # ~10 min on 2 CPU cores; re-run to resume
  bagel-ft demo --out runs/demo --until train            # stop after a phase (data, train, psir, eval_*, report)
  bagel-ft demo --out runs/demo --redo eval_ft_psir      # redo a phase and everything after it
  bagel-ft demo --out runs/d2 --base DIR --set train.steps=400 --prompts 400 --eval-limit 10
  bagel-ft demo --out runs/micro --prompts 8 --set train.steps=4 --eval-limit 1 --psir-prompts 2   # plumbing, ~1 min
  bagel-ft demo --reproduce --out runs/repro             # the miniature reproduction (python -m demo.reproduce)

Phases (demo/pipeline.py): data -> train -> psir -> eval_base -> eval_ft_single -> eval_ft_psir -> report; each
shows a progress bar with its ETA and leaves OUT/phases/<phase>.json when finished, so an interrupted run
continues where it stopped (training from its last checkpoint). The base model is checkpoints/shapes-base
beside the package (build it with `python -m demo.base_model --out checkpoints/shapes-base`) unless --base.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from demo.pipeline import PHASE_NAMES, TRAIN_CONFIG, DemoSettings

    d = DemoSettings(out="")
    parser.add_argument("--out", required=True, help="demo folder (created; an existing one is resumed)")
    parser.add_argument(
        "--base", default=None, help="base checkpoint dir (default: the shipped checkpoints/shapes-base)"
    )
    parser.add_argument("--config", default=str(TRAIN_CONFIG), help="training YAML (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted training override (repeatable), e.g. --set train.steps=400")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=d.prompts, help="prompts per data pipeline (%(default)s)")
    parser.add_argument("--data-seed", type=int, default=d.data_seed, help="data_gen run seed (%(default)s)")
    parser.add_argument("--psir-prompts", type=int, default=d.psir_prompts,
                        help="held-out prompts drawn by the PSIR loop for the report's strips (%(default)s)")  # fmt: skip
    parser.add_argument("--eval-limit", type=int, default=d.eval_limit,
                        help="ShapesEval prompts per category (%(default)s; the fixed set has 40)")  # fmt: skip
    parser.add_argument("--eval-subset", default=None,
                        help="comma-separated ShapesEval categories (default: all ten)")  # fmt: skip
    parser.add_argument("--replay", type=float, default=d.replay,
                        help="share of base records in the fine-tune's mixture (%(default)s)")  # fmt: skip
    parser.add_argument("--eval-n", type=int, default=d.eval_n, help="samples per ShapesEval prompt (%(default)s)")
    parser.add_argument("--eval-seed", type=int, default=d.eval_seed, help="ShapesEval base seed (%(default)s)")
    parser.add_argument("--infer-set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted inference override (repeatable), e.g. --infer-set options.flow.num_timesteps=11")  # fmt: skip
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (%(default)s)")
    parser.add_argument("--until", choices=PHASE_NAMES, default=None, help="stop after this phase")
    parser.add_argument("--redo", choices=PHASE_NAMES, default=None,
                        help="delete this phase's and later phases' outputs, then run them again")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--reproduce", action="store_true",
                        help="run the miniature reproduction with its defaults instead (python -m demo.reproduce --help for its flags)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from demo.pipeline import DemoError, DemoSettings, run_demo

    if args.reproduce:
        from demo import reproduce

        return reproduce.main(["--out", args.out, "--threads", str(args.threads)]
                              + (["--base", args.base] if args.base else []))  # fmt: skip
    settings = DemoSettings(
        out=args.out, base=args.base, train_config=args.config, train_overrides=list(args.set), prompts=args.prompts,
        data_seed=args.data_seed, psir_prompts=args.psir_prompts, eval_limit=args.eval_limit, eval_n=args.eval_n,
        eval_subset=args.eval_subset.split(",") if args.eval_subset else None, eval_seed=args.eval_seed,
        inference_overrides=list(args.infer_set), replay=args.replay, threads=args.threads, progress=not args.quiet,
    )  # fmt: skip
    try:
        run_demo(settings, until=args.until, redo=args.redo)
    except DemoError as e:
        print(f"bagel-ft demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # `python -m demo.cli ...` == `bagel-ft demo ...`
    _parser = argparse.ArgumentParser(
        prog="python -m demo.cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
