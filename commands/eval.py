"""Evaluate a generator on GenEval, WISE or ShapesEval; every run resumes where a killed one stopped.

  # GenEval, 4 images per prompt, official layout; scored when the official scorer is installed
  # (GENEVAL_REPO + GENEVAL_MODEL_PATH, needs mmdet + CUDA; see eval/geneval.py), else summarised later
  bagel-ft eval geneval --ckpt runs/ft/ckpt --mode psir --out runs/eval/geneval-ft-psir
  bagel-ft eval geneval --out runs/eval/geneval-ft-psir --stage score     # after scoring elsewhere

  # WISE (1,000 prompts, one image each) judged by an OpenAI-compatible VLM (key from $OPENAI_API_KEY)
  bagel-ft eval wise --ckpt runs/ft/ckpt --out runs/eval/wise-ft --judge-config configs/eval/wise_gpt4o.yaml
  bagel-ft eval wise --ckpt runs/ft/ckpt --out runs/eval/wise-ft --judge-config configs/eval/wise_local_vllm.yaml

  # ShapesEval: the shapes world's exact benchmark, scored by the pixel-level judge
  bagel-ft eval shapes --ckpt runs/ft/ckpt --mode scaled --out runs/eval/shapes-ft-scaled
  bagel-ft eval shapes --ckpt oracle:shapes --out runs/eval/shapes-oracle          # the judge's ceiling

  # a unified model's skills on held-out shapes scenes: t2i, edit, verdict, caption (eval/skills.py)
  bagel-ft eval skills --ckpt checkpoints/shapes-base --out runs/eval/skills-base --limit 20

  # CPU-sized smoke run of the plumbing (noise images, 2 prompts per category)
  bagel-ft eval geneval --ckpt debug:noise --out /tmp/geneval-smoke --n 2 --limit 2

  # data parallel: 8 GPUs of one machine (one rank each; rank 0 scores once all are done), or separate
  # launches sharing the run folder (each draws every N-th prompt; then score once with --stage score)
  torchrun --nproc_per_node 8 --no-python -- bagel-ft eval geneval --ckpt runs/ft/ckpt --mode psir --out RUN
  bagel-ft eval geneval --ckpt runs/ft/ckpt --mode psir --out RUN --shard 0/2     # and --shard 1/2 elsewhere

--ckpt takes a checkpoint directory, `oracle:shapes`, `debug:noise` or `py:MODULE:FACTORY` (eval/generator.py).
--limit K keeps the first K prompts of each category; --subset picks categories (GenEval tags, WISE
culture|time|space|biology|physics|chemistry, ShapesEval categories). Prompt files are read by path:
--metadata / --prompts-dir default to $BAGEL_FT_BENCHMARKS (else ../shared/benchmarks) + geneval/... or wise/.
--batch-size B draws B samples at once (one packed forward per step for all of them; each sample seeded by
itself, so the images equal batch 1's); default: 16 on CPU, by image size on a GPU (inference.api).
--stage generate | score | all (default). Scoring uses what is on disk: WISE re-asks the judge only what
it has not answered (cached replies), GenEval re-runs the official scorer only when results.jsonl is stale.
Then compare runs:  bagel-ft report runs/eval/geneval-base runs/eval/geneval-ft-psir --out runs/report
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from commands.options import add_set_argument, split_overrides, strip_section
from common.config import apply_overrides, merge, read_yaml

BENCHMARKS = ("geneval", "wise", "shapes", "skills")
REPO = Path(__file__).resolve().parent.parent


def default_benchmarks_dir() -> Path:
    return Path(os.environ.get("BAGEL_FT_BENCHMARKS") or REPO.parent / "shared" / "benchmarks")


def add_arguments(parser) -> None:
    parser.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark to run")
    parser.add_argument("--out", required=True, help="run directory (created; an existing one is resumed)")
    parser.add_argument(
        "--ckpt",
        default=None,
        help="checkpoint dir | oracle:shapes | debug:noise | py:MODULE:FACTORY (required unless --stage score)",
    )
    parser.add_argument("--mode", default="single", choices=("single", "psir", "scaled"), help="inference mode")
    parser.add_argument("--n", type=int, default=None, help="samples per prompt (GenEval and ShapesEval: 4; WISE: 1)")
    parser.add_argument("--limit", type=int, default=None, help="keep the first K prompts of each category")
    parser.add_argument("--subset", default=None, help="comma-separated categories to run (default: all)")
    parser.add_argument(
        "--seed", type=int, default=None, help="base seed (default 0); sample s of prompt i uses seed + 1000 i + s"
    )
    parser.add_argument("--label", default=None, help="row label in reports (default: <ckpt name>/<mode>)")
    parser.add_argument("--stage", default="all", choices=("all", "generate", "score"), help="what to run")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples drawn at once (default: 16 on CPU, by image size on a GPU)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="draw every N-th prompt from the I-th (separate launches into one --out; "
        "score afterwards with --stage score). Under torchrun the ranks shard themselves",
    )
    parser.add_argument("--metadata", default=None, help="GenEval evaluation_metadata.jsonl")
    parser.add_argument("--prompts-dir", default=None, help="WISE prompt JSON file or directory")
    parser.add_argument("--grid", action="store_true", help="GenEval: also write grid.png per prompt")
    parser.add_argument("--geneval-repo", default=None, help="GenEval checkout (default $GENEVAL_REPO)")
    parser.add_argument("--geneval-model-path", default=None, help="Mask2Former folder (default $GENEVAL_MODEL_PATH)")
    parser.add_argument(
        "--inference-config",
        default=None,
        help="inference YAML for a checkpoint --ckpt: load: and options: sections (configs/eval/inference_*.yaml); "
        "over the checkpoint's own inference.yaml, else inference's defaults",
    )
    parser.add_argument("--judge-config", default=None, help="WISE judge YAML (configs/eval/wise_*.yaml)")
    parser.add_argument("--judge-model", default=None, help="override the judge config's model (= --set judge.model=M)")
    parser.add_argument("--judge-base-url", default=None, help="override the judge config's base_url")
    add_set_argument(parser, "options.flow.num_timesteps=11 (inference: load.* / options.*) or judge.model=M")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from eval.run_dir import CONFIG_FILE, RunDirError, prepare_run_dir, read_config, write_json_atomic
    from inference.sharding import current_shard, wait_for_all

    try:
        args.shard = current_shard(args.shard)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if args.shard.count > 1 and args.stage == "score":
        raise SystemExit("--stage score runs once over the whole run folder: one process, without --shard or torchrun")
    out = Path(args.out)
    for flag in ("n", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag}: expected a count >= 1, got {getattr(args, flag)}")
    if args.benchmark == "skills":
        if args.shard.count > 1:
            raise SystemExit("bagel-ft eval skills runs in one process: without --shard or torchrun")
        return _skills(args, out)
    if args.stage == "score":  # score what was generated: its n / subset / limit unless given again
        old = read_config(out)
        if not old:
            raise SystemExit(f"{out}: no config.json; generate first (--stage all or generate)")
        for key in ("n", "limit", "subset", "seed"):
            if getattr(args, key) is None:
                value = old.get(key)
                setattr(args, key, ",".join(value) if key == "subset" and value else value)
    args.seed = args.seed if args.seed is not None else 0
    subset = [s.strip() for s in args.subset.split(",")] if args.subset else None
    n = args.n if args.n is not None else (1 if args.benchmark == "wise" else 4)
    if args.benchmark == "wise" and n != 1:
        raise SystemExit("bagel-ft eval wise: WISE judges one image per prompt (--n 1)")
    generating = args.stage in ("all", "generate")
    if generating and not args.ckpt:
        raise SystemExit(f"bagel-ft eval {args.benchmark}: --ckpt is required to generate (or use --stage score)")
    judge = _judge_config(args) if args.benchmark == "wise" and args.stage != "generate" else None
    generator = None
    if generating:
        config = _run_config(args, n, subset, judge)
        try:
            prepare_run_dir(out, config)
        except RunDirError as e:
            raise SystemExit(str(e)) from e
        from eval.generator import load_generator

        generator = load_generator(args.ckpt, args.mode, config=config["inference"])
        config["generator"] = generator.name  # known once loaded; the check above already passed
        prepare_run_dir(out, config)
    if judge is not None and args.shard.is_first:  # the judge is part of what produced the scores
        write_json_atomic(out / CONFIG_FILE, dict(read_config(out), judge=judge.public()))
    benchmark = {"geneval": _geneval, "wise": _wise, "shapes": _shapes}[args.benchmark]
    if generator is not None:
        benchmark(args, out, generator, n, subset, judge, score=False)
    wait_for_all(args.shard)  # torchrun: every rank's samples are on disk
    if args.stage == "generate":
        return 0
    if args.shard.count > 1 and not args.shard.launched:
        print(f"shard {args.shard} done; once every shard is: bagel-ft eval {args.benchmark} --out {out} --stage score")
        return 0
    if not args.shard.is_first:
        return 0
    benchmark(args, out, None, n, subset, judge, score=True)  # once, over every shard's samples
    return 0


def _geneval(args, out: Path, generator, n: int, subset, judge, score: bool) -> None:
    from eval import geneval

    if generator is not None:
        metadata = args.metadata or default_benchmarks_dir() / "geneval" / "evaluation_metadata.jsonl"
        stats = geneval.generate_geneval(generator, metadata, out, n=n, seed=args.seed, subset=subset,
                                         limit=args.limit, grid=args.grid, progress=_progress(args),
                                         batch_size=args.batch_size, shard=args.shard)  # fmt: skip
        print(stats)
    if score:
        geneval.score_geneval(out, repo=args.geneval_repo, model_path=args.geneval_model_path)


def _wise(args, out: Path, generator, n: int, subset, judge, score: bool) -> None:
    from eval import wise

    prompts = wise.load_prompts(args.prompts_dir or default_benchmarks_dir() / "wise")
    prompts = wise.select_prompts(prompts, subset, args.limit)
    if generator is not None:
        print(
            wise.generate_wise(
                generator,
                prompts,
                out,
                seed=args.seed,
                progress=_progress(args),
                batch_size=args.batch_size,
                shard=args.shard,
            )
        )
    if score:
        _print_wise(wise.judge_wise(out, prompts, judge, progress=not args.quiet))


def _shapes(args, out: Path, generator, n: int, subset, judge, score: bool) -> None:
    from eval import shapes_eval

    prompts = shapes_eval.select_prompts(shapes_eval.load_prompts(), subset, args.limit)
    if generator is not None:
        print(
            shapes_eval.generate_shapes(
                generator,
                prompts,
                out,
                n=n,
                seed=args.seed,
                progress=_progress(args),
                batch_size=args.batch_size,
                shard=args.shard,
            )
        )
    if score:
        print(shapes_eval.format_summary(shapes_eval.score_shapes(out, prompts, n=n, progress=not args.quiet)))


def _progress(args) -> bool:
    return not args.quiet and args.shard.is_first  # one progress bar, not one per rank


def _skills(args, out: Path) -> int:
    from eval.run_dir import RunDirError
    from eval.skills import SKILLS, SkillsConfig, run
    from inference.settings import checkpoint_options

    if not args.ckpt:
        raise SystemExit("bagel-ft eval skills: --ckpt is required")
    skills = [s.strip() for s in args.subset.split(",")] if args.subset else list(SKILLS)
    unknown = sorted(set(skills) - set(SKILLS))
    if unknown:
        raise SystemExit(f"bagel-ft eval skills: --subset {','.join(unknown)}: expected some of {','.join(SKILLS)}")
    config = SkillsConfig(skills=skills, seed=args.seed or 0)
    # how every skill draws: the checkpoint's inference.yaml, then options.flow of --inference-config / --set
    flow = merge(
        checkpoint_options(args.ckpt).get("flow", {}),
        ((inference_config(args) or {}).get("options") or {}).get("flow", {}),
    )
    fields = ("num_timesteps", "timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_interval")
    unknown = sorted(set(flow) - set(fields) - {"height", "width", "cfg_renorm_type", "cfg_renorm_min"})
    if unknown:
        raise SystemExit(f"options.flow: {unknown} unknown to eval skills; expected {fields}")
    for key in fields:
        if key in flow:
            setattr(config, key, tuple(flow[key]) if key == "cfg_interval" else flow[key])
    if args.limit is not None:
        config.limit = args.limit
    try:
        run(args.ckpt, out, config)
    except RunDirError as e:
        raise SystemExit(str(e)) from e
    return 0


def _judge_config(args):
    from eval.wise import JudgeConfig

    path = args.judge_config or REPO / "configs" / "eval" / "wise_gpt4o.yaml"
    flags = [f"{k}={v}" for k, v in (("model", args.judge_model), ("base_url", args.judge_base_url)) if v is not None]
    overrides = strip_section(split_overrides(args.set, ("load", "options", "judge"))["judge"])
    config = JudgeConfig.from_yaml(path, flags + overrides)
    try:
        config.api_key()  # fail before hours of generation, not after
    except RuntimeError as e:
        raise SystemExit(f"{e} (or run --stage generate now and --stage score later)") from e
    return config


def _run_config(args, n: int, subset: list[str] | None, judge) -> dict[str, Any]:
    return {
        "benchmark": args.benchmark,
        "ckpt": args.ckpt,
        "mode": args.mode,
        "n": n,
        "seed": args.seed,
        "limit": args.limit,
        "subset": subset,
        "label": args.label,
        "judge": judge.public() if judge else None,
        "inference": inference_config(args),
        "argv": sys.argv,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def inference_config(args) -> dict[str, Any] | None:
    """The inference YAML (--inference-config) with the `load.*` / `options.*` overrides of --set; None = the
    checkpoint's and inference's defaults."""
    overrides = split_overrides(args.set, ("load", "options", "judge"))
    inference = overrides["load"] + overrides["options"]
    if not args.inference_config and not inference:
        return None
    return apply_overrides(read_yaml(args.inference_config) if args.inference_config else {}, inference)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _print_wise(summary: dict) -> None:
    for cat, c in summary["categories"].items():
        print(f"{cat:<10} WiScore {c['score']:.3f} (n={c['n']})")
    overall = summary["overall"]
    print(f"overall    {overall:.3f}" if overall is not None else f"overall (partial) {summary['overall_partial']}")
    stats = summary["judge_stats"]
    print(
        f"judge: {stats['requests']} requests, {stats['cache_hits']} cached, {stats['retries']} retries, "
        f"{stats['malformed_replies']} malformed replies, {len(summary['unscored'])} images unscored"
    )


if __name__ == "__main__":  # `python -m commands.eval ...` (torchrun -m) == `bagel-ft eval ...`
    from commands.main import main

    sys.exit(main(["eval", *sys.argv[1:]]))
