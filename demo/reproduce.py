"""The paper's claim in miniature: fine-tune the shapes base model several ways at equal optimizer steps and equal
pack size (tokens per step), then score every arm on the same ShapesEval prompts with the same seeds.

    python -m demo.reproduce --out runs/repro                  # all 400 ShapesEval prompts, seeds 0 and 1
    python -m demo.reproduce --out runs/repro-val --eval-set validation --arms single,psir --seeds 0 \
        --eval-limit 5 --set optim.lr=2e-4 --replay 0.3        # one point of the settings search (never ShapesEval)
    python -m demo.reproduce --out runs/repro-s0 --seeds 0 & python -m demo.reproduce --out runs/repro-s1 --seeds 1
    python -m demo.reproduce --out runs/repro --merge runs/repro-s0,runs/repro-s1   # one table (2 cores, 2 runs)
    python -m demo.reproduce --out /tmp/repro-smoke --base /tmp/base --prompts 16 --steps 4 --eval-limit 1 \
        --seeds 0 --critique-prompts 4 --critiques drafter      # plumbing only, a few minutes

Arms (from the same base, configs/train/demo_psir.yaml, the same steps and packing, `run.seed` = seed):
  single       `t2i` records: each trajectory prompt -> that trajectory's final image (nothing else)
  psir         the multi-turn `trajectory` records (plan / sketch with modify / swap / remove edits, an inspect
               after every image)
  psir_crit    trajectories + `critique` records self-sampled from the psir arm (seed 0: its own PSIR streams on
               held-back prompts, judged step by step, corrected by the shapes editor) + `alignment` pairs;
               `--critiques drafter` uses data_gen's offline imperfect drafter instead of the model's own streams
  psir_sketch  the ablation: the trajectories without their inspect turns but the closing one (the stop
               signal), i.e. plan + incremental sketches with no inspect / refine in between
With `--replay R`, a share R of every arm's mixture is base records (`demo.base_data`, the unified mixture's
tasks and weights, `demo.pipeline.write_replay`), the same for every arm.

Eval: the first `--eval-limit` prompts of every category (40 = all of ShapesEval), one sample each, eval seed =
the arm's seed; the base and the single arm in single mode, the PSIR arms in psir mode and (cost-matched) in
single mode. `--eval-set validation` scores on generated prompts outside ShapesEval and every training prompt
instead: the settings (learning rate, steps, replay) are chosen there, the same for every arm. The table
(OUT/results.md, OUT/results.json) gives per-category accuracy as the mean over seeds with a 95% bootstrap
interval over prompts, the sub-accuracies (mean ± half the range over seeds), the inference cost per prompt
(images, Euler steps), where the PSIR streams go wrong, and the tokens each arm trained on.

Phases are demo.pipeline's (OUT/phases/<name>.json, resumable; an interrupted training continues from its last
checkpoint). Training prompts exclude ShapesEval's; critique prompts are disjoint from the training prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo.pipeline import (
    TRAIN_CONFIG,
    DemoError,
    Layout,
    Phase,
    base_canvas,
    build_subset,
    check_settings,
    data_config,
    eval_prompt_texts,
    find_base,
    inference_config,
    run_phases,
    shapes_eval_run,
    train_config,
    training_prompts,
    training_summary,
    with_replay,
    write_replay,
)
from eval.run_dir import read_jsonl

ARMS = {  # arm -> (training sources relative to OUT, eval modes)
    "single": ([{"path": "data/t2i", "weight": 1.0}], ("single",)),
    "psir": ([{"path": "data/trajectories", "weight": 1.0}], ("psir", "single")),
    "psir_crit": (
        [
            {"path": "data/trajectories", "weight": 0.6},
            {"path": "data/critiques", "weight": 0.2},
            {"path": "data/alignment", "weight": 0.2},
        ],
        ("psir", "single"),
    ),
    # the ablation: plan + incremental sketches, no inspect turn but the closing one (the stop signal), no refine
    "psir_sketch": ([{"path": "data/sketches", "weight": 1.0}], ("psir",)),
}
CRITIQUE_SEED = 1  # data_gen run seed of the critique prompts (disjoint from the training prompts by filtering)
VALIDATION_SEED = 20261206  # prompt seed of the validation set (fine-tune settings are chosen on it)
EVAL_SETS = ("shapes", "validation")


@dataclass
class ReproSettings:
    out: str | Path  # the reproduction folder (re-run with the same one to resume)
    base: str | Path | None = None  # base checkpoint; None = the shipped checkpoints/shapes-base
    train_config: str | Path = TRAIN_CONFIG  # the trainer YAML shared by all arms
    train_overrides: list[str] = field(default_factory=list)  # dotted overrides applied to every arm
    steps: int = 1000  # optimizer steps per arm (5.5% of the base's; 2000 validated, 1000 for compute: docs/results.md)
    prompts: int = 400  # trajectory / alignment prompts
    critique_prompts: int = 64  # prompts the psir arm drafts for the critiques (~10 s each on a CPU)
    critiques: str = "self"  # self (the psir arm's own streams) | drafter (data_gen's offline imperfect drafter)
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # training (run.seed) and eval seeds
    arms: list[str] = field(default_factory=lambda: list(ARMS))  # which arms to train (experiments: a subset)
    data_overrides: list[str] = field(default_factory=list)  # data_gen config overrides, e.g. pipeline.edit_prob=0
    inference_overrides: list[str] = field(default_factory=list)  # e.g. options.budget.max_images=3 (every eval)
    replay: float = (
        0.3  # share of every arm's mixture given to base records (the unified mixture; chosen on validation)
    )
    eval_set: str = "shapes"  # shapes (ShapesEval) | validation (generated prompts, for choosing settings)
    eval_limit: int = 40  # prompts per category (ShapesEval: 40 = all 400; x seeds = images per category and arm)
    threads: int = 1  # torch CPU threads (see demo.pipeline.DemoSettings.threads)
    progress: bool = True

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("out", "threads", "progress"):
            d.pop(k)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


class Repro:
    def __init__(self, s: ReproSettings, log=print):
        self.s, self.log = s, log
        self.root = Path(s.out)
        self.base = find_base(s.base)
        self.inference = inference_config(s.inference_overrides)
        self.canvas = base_canvas(self.base)

    def arm_dir(self, arm: str, seed: int) -> Path:
        return self.root / "arms" / f"{arm}-s{seed}"

    def ckpt(self, arm: str, seed: int) -> Path:
        return self.base if arm == "base" else self.arm_dir(arm, seed) / "export"

    def eval_dir(self, arm: str, seed: int, mode: str) -> Path:
        return self.root / "eval" / f"{arm}-s{seed}-{mode}"

    def prompts(self) -> tuple[list[str], list[str]]:
        """(training prompts, critique prompts): disjoint, neither in ShapesEval."""
        held = eval_prompt_texts()
        train = training_prompts(self.s.prompts, 0, held)
        return train, training_prompts(self.s.critique_prompts, CRITIQUE_SEED, held | set(train))

    def eval_prompts(self) -> list[dict] | None:
        """The prompt dicts every arm is scored on: None = ShapesEval's; `validation`: generated prompts outside
        ShapesEval and every training and critique prompt (categories in round robin, `eval_limit` each)."""
        if self.s.eval_set == "shapes":
            return None
        from demo.pipeline import held_out_prompts
        from eval.shapes_eval import as_eval_prompts
        from scene_graphs.shapes import CATEGORIES

        train, crit = self.prompts()
        exclude = eval_prompt_texts() | set(train) | set(crit)
        return as_eval_prompts(held_out_prompts(self.s.eval_limit * len(CATEGORIES), exclude, VALIDATION_SEED))

    def sources(self, arm: str) -> list[dict]:
        """The arm's training sources, with the base-record replay (`replay` of the mixture) when asked."""
        return with_replay(ARMS[arm][0], self.s.replay)


# ---- phases ------------------------------------------------------------------------------------------------
def phase_data(r: Repro) -> dict[str, Any]:
    train, _ = r.prompts()
    cfg = data_config(r.canvas, r.s.data_overrides)
    out = {
        name: build_subset(name, train, r.root / "data" / name, cfg, 0)["kept"]
        for name in ("trajectories", "alignment")
    }
    out["t2i"] = write_t2i(r.root / "data" / "trajectories", r.root / "data" / "t2i")
    out["sketches"] = write_sketches(r.root / "data" / "trajectories", r.root / "data" / "sketches")
    if r.s.replay > 0:
        out["replay"] = write_replay(r.root / "data" / "replay", r.canvas)
    return {"records": out, "prompts": len(train)}


def write_sketches(trajectories: Path, out: Path) -> int:
    """The ablation's records: every trajectory without its inspect turns, but the closing one (the stop)."""
    from bagel_ft.trajectory import Trajectory
    from data_gen.shards import write_parquet
    from training.data import RecordTable

    table = RecordTable(trajectories)
    records = []
    for i in range(len(table)):
        t = table.get(i)
        last = max(k for k, turn in enumerate(t.turns) if turn.role == "inspect")
        turns = [turn for k, turn in enumerate(t.turns) if turn.role != "inspect" or k == last]
        meta = {**t.meta, "source": "demo.reproduce:sketches", "from_record": t.id}
        records.append(Trajectory(t.prompt, turns, list(t.images), "trajectory", meta=meta))
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(records, out / "sketches-00000.parquet")
    return len(records)


def write_t2i(trajectories: Path, out: Path) -> int:
    """`t2i` records (prompt -> the final image) of every trajectory record: the single-pass arm's data."""
    from bagel_ft.trajectory import Trajectory, Turn
    from data_gen.shards import write_parquet
    from training.data import RecordTable

    table = RecordTable(trajectories)
    records = []
    for i in range(len(table)):
        t = table.get(i)
        meta = {"source": "demo.reproduce:t2i", "seed": t.meta.get("seed"), "from_record": t.id}
        records.append(Trajectory(t.prompt, [Turn("image", image=0, loss=True)], [t.final_image()], "t2i", meta=meta))
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(records, out / "t2i-00000.parquet")
    return len(records)


def phase_critiques(r: Repro) -> dict[str, Any]:
    _, prompts = r.prompts()
    budget = r.inference["options"]["budget"]
    overrides = []
    if r.s.critiques == "self":
        overrides = [
            "backends.sampler=model",
            f"model_sampler.ckpt={r.ckpt('psir', r.s.seeds[0])}",
            f"model_sampler.timesteps={r.inference['options']['flow']['num_timesteps']}",
            f"model_sampler.max_images={budget['max_images']}",
            f"model_sampler.max_steps={budget['max_steps']}",
        ]
    elif r.s.critiques != "drafter":
        raise DemoError(f"--critiques: expected self or drafter, got {r.s.critiques!r}")
    t = build_subset(
        "critiques",
        prompts,
        r.root / "data" / "critiques",
        data_config(r.canvas, [*r.s.data_overrides, *overrides]),
        CRITIQUE_SEED,
    )
    if not t["kept"]:
        raise DemoError(f"critiques: no record from {t['items']} drafts (rejected: {t['rejected']})")
    return {"records": t["kept"], "prompts": t["items"], "rejected": t["rejected"], "invalid": t["invalid"]}


def arm_overrides(r: Repro, arm: str, seed: int) -> list[str]:
    """The trainer overrides of one arm: its sources, steps, seed, run dir, and its calibrated pack size."""
    run_dir = r.arm_dir(arm, seed).relative_to(r.root)
    return [*r.s.train_overrides, f"train.steps={r.s.steps}", f"run.seed={seed}", f"run.dir={run_dir}",
            f"data.sources={json.dumps(r.sources(arm))}", *packing(r, arm)]  # fmt: skip


def mean_pack_tokens(cfg, packs: int = 200) -> float:
    """Mean tokens of the first `packs` packs the trainer's data stream yields (after CFG dropout), no model."""
    from training.parallelize import init_distributed
    from training.trainer import build_streams, build_tokenizer, model_config

    stream = build_streams(cfg, model_config(cfg), build_tokenizer(cfg), init_distributed("cpu"))[0].stream
    return sum(stream.next_pack().batch.sequence_length for _ in range(packs)) / packs


def packing(r: Repro, arm: str) -> list[str]:
    """Equal tokens per step: the single arm packs as the YAML says (its mean tokens per pack is the target); the
    other arms' multi-image records are ~5x longer, so their packs are coarser and, at the same budget, shorter on
    average. Their data.expected_num_tokens is set so their mean matches the target (secant steps on the
    packer itself, ~1 min), with max_num_tokens = expected + the longest sample so no pack ends early for lack of
    room. Cached in OUT/packing.json; the table reports the tokens each arm actually saw."""
    path = r.root / "packing.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}

    def measure(name: str, extra: list[str]) -> float:
        overrides = [*r.s.train_overrides, f"data.sources={json.dumps(r.sources(name))}", "data.prefetch=0", *extra]
        return mean_pack_tokens(train_config(r.s.train_config, overrides, r.root, r.base, r.s.threads, False))

    if "single" not in cache:
        cache["single"] = {"overrides": [], "mean_tokens": measure("single", [])}
    if arm not in cache:
        target = cache["single"]["mean_tokens"]
        cfg = train_config(r.s.train_config, list(r.s.train_overrides), r.root, r.base, r.s.threads, False)
        longest, expected = cfg.data.max_num_tokens_per_sample, cfg.data.expected_num_tokens

        def at(e: int) -> list[str]:
            return [f"data.expected_num_tokens={e}", f"data.max_num_tokens={e + longest}"]

        tried = [(expected, measure(arm, at(expected)))]
        step = target - tried[0][1]  # first guess: the mean grows ~1:1 with expected_num_tokens
        for _ in range(3):  # then secant steps on the measured means
            e = max(1, round(tried[-1][0] + step))
            tried.append((e, measure(arm, at(e))))
            (e0, m0), (e1, m1) = tried[-2], tried[-1]
            step = (target - m1) * (e1 - e0) / (m1 - m0) if m1 != m0 else target - m1
        expected, mean = min(tried, key=lambda t: abs(t[1] - target))
        cache[arm] = {"overrides": at(expected), "mean_tokens": mean, "target": target}
    path.write_text(json.dumps(cache, indent=1) + "\n")
    return list(cache[arm]["overrides"])


def phase_train(arm: str, seed: int):
    def run(r: Repro) -> dict[str, Any]:
        from training.trainer import train

        train(train_config(r.s.train_config, arm_overrides(r, arm, seed), r.root, r.base, r.s.threads, r.s.progress))
        return {**training_summary(r.arm_dir(arm, seed)), "packing": packing(r, arm)}

    return run


def phase_eval(arm: str, seed: int, mode: str):
    def run(r: Repro) -> dict[str, Any]:
        s = r.s
        name = f"{arm}-s{seed}-{mode}"
        summary = shapes_eval_run(r.ckpt(arm, seed), mode, r.eval_dir(arm, seed, mode), r.inference, s.eval_limit, 1,
                                  seed, name, progress=s.progress, prompts=r.eval_prompts())  # fmt: skip
        r.log(f"  {name}: overall {summary['overall']:.3f}")
        return {"overall": summary["overall"], "cost_per_sample": summary["cost_per_sample"]}

    return run


def phase_table(r: Repro) -> dict[str, Any]:
    """results.json / results.md (the table), and eval.report's comparison of every eval run (OUT/report/)."""
    from eval.report import write_report

    results = collect(r)
    (r.root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (r.root / "results.md").write_text(markdown(results))
    write_report(sorted(p for p in (r.root / "eval").iterdir() if (p / "summary.json").is_file()), r.root / "report")
    print(markdown(results))
    return {"rows": len(results["rows"])}


def phases(s: ReproSettings) -> list[Phase]:
    """data -> psir arm (first seed) -> the critiques it drafts -> the other trainings -> evals -> table."""
    if s.eval_set not in EVAL_SETS:
        raise DemoError(f"eval_set: expected one of {EVAL_SETS}, got {s.eval_set!r}")
    if not 0 <= s.replay < 1:
        raise DemoError(f"replay: expected a share in [0, 1), got {s.replay}")
    unknown = set(s.arms) - set(ARMS)
    if unknown or (s.critiques == "self" and "psir_crit" in s.arms and "psir" not in s.arms):
        raise DemoError(f"arms: expected some of {list(ARMS)} (psir_crit with self critiques needs psir), got {s.arms}")
    arms = [a for a in ARMS if a in s.arms]
    trainings = sorted(((a, sd) for sd in s.seeds for a in arms), key=lambda t: (t != ("psir", s.seeds[0]),))
    out = [Phase("data", "trajectories + alignment (data_gen), t2i from their final images", phase_data,
                 lambda root: [root / "data", root / "packing.json"])]  # fmt: skip
    for k, (arm, seed) in enumerate(trainings):
        out.append(Phase(f"train-{arm}-s{seed}", f"fine-tune arm {arm}, seed {seed}", phase_train(arm, seed),
                         lambda root, a=arm, sd=seed: [root / "arms" / f"{a}-s{sd}"]))  # fmt: skip
        if k == 0 and "psir_crit" in arms:  # right after the psir arm's first seed: the drafts are its streams
            drafter = "the psir arm's own streams" if s.critiques == "self" else "the offline drafter"
            out.append(Phase("critiques", f"critiques of {drafter}", phase_critiques,
                             lambda root: [root / "data" / "critiques"]))  # fmt: skip
    for seed in s.seeds:
        for arm, mode in evaluated(s):
            out.append(Phase(f"eval-{arm}-s{seed}-{mode}", f"ShapesEval {arm} seed {seed} {mode}",
                             phase_eval(arm, seed, mode),
                             lambda root, a=arm, sd=seed, m=mode: [root / "eval" / f"{a}-s{sd}-{m}"]))  # fmt: skip
    out.append(Phase("table", "results.md / results.json, report/", phase_table,
                     lambda root: [root / "results.md", root / "results.json", root / "report"]))  # fmt: skip
    return out


def evaluated(s: ReproSettings) -> list[tuple[str, str]]:
    """(model, mode) of every eval row: the base in single mode, then each arm in its modes."""
    return [("base", "single")] + [(a, m) for a, (_, modes) in ARMS.items() if a in s.arms for m in modes]


# ---- the table --------------------------------------------------------------------------------------------
def collect(r: Repro) -> dict[str, Any]:
    """Per (arm, mode): per-seed summaries, mean and half-range of every category / sub-accuracy, cost, tokens."""
    rows = []
    for arm, mode in evaluated(r.s):
        per_seed = {}
        for seed in r.s.seeds:
            path = r.eval_dir(arm, seed, mode) / "summary.json"
            if path.is_file():
                per_seed[seed] = json.loads(path.read_text())
        if not per_seed:
            continue
        train = {sd: training_summary(r.arm_dir(arm, sd)) for sd in per_seed} if arm != "base" else {}
        streams = [stream_diagnostics(r.eval_dir(arm, sd, mode)) for sd in per_seed] if mode == "psir" else []
        records = {sd: read_jsonl(r.eval_dir(arm, sd, mode) / "records.jsonl") for sd in per_seed}
        rows.append({"arm": arm, "mode": mode, "seeds": sorted(per_seed), "scores": spread(per_seed),
                     "ci": bootstrap_ci(records),
                     "cost": _mean([s["cost_per_sample"] or {} for s in per_seed.values()]),
                     "streams": _mean(streams) if streams else {}, "train": train})  # fmt: skip
    return {"settings": r.s.identity(), "base": str(r.base), "rows": rows}


def bootstrap_ci(records: dict[int, list[dict]], draws: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of overall (mean over categories) and of every category's accuracy, by the bootstrap over
    prompts: each draw resamples the prompts of every category with replacement, keeping a prompt's images of
    all seeds together, and averages over prompts and seeds (percentiles 2.5 / 97.5)."""
    import numpy as np

    by_cat: dict[str, dict[str, list[float]]] = {}  # category -> prompt index -> correct per seed
    for rows in records.values():
        for rec in rows:
            prompt = rec["key"].split("_")[0]
            by_cat.setdefault(rec["category"], {}).setdefault(prompt, []).append(float(rec["correct"]))
    if not by_cat:
        return {}
    rng = np.random.default_rng(seed)
    samples = {}
    for cat, prompts in by_cat.items():
        acc = np.array([sum(v) / len(v) for v in prompts.values()])  # per prompt, mean over seeds
        idx = rng.integers(0, len(acc), size=(draws, len(acc)))
        samples[cat] = acc[idx].mean(axis=1)
    samples["overall"] = np.mean([samples[c] for c in by_cat], axis=0)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items()}


STREAM_KEYS = (
    "no_image",
    "format_failure",
    "plan_ok",
    "draws_plan",
    "first_right",
    "final_right",
    "overplans",
    "says_consistent",
    "inspect_right",
)


def planned_scene(plan_turn_text: str):
    """The scene graph of a plan turn's <des>, None when it has none or it does not parse."""
    from bagel_ft.trajectory import extract
    from scene_graphs.shapes import ParseError, parse_prompt

    try:
        des = extract("des", plan_turn_text)
        return parse_prompt(des) if des else None
    except ParseError:
        return None


def inspected_drafts(traj):
    """(the last plan's <des> scene or None, the last image or None, the inspect turn said "consistent") for each
    inspect turn of a PSIR stream, in order."""
    plan, image = None, None
    for t in traj.turns:
        if t.role == "plan":
            plan = planned_scene(t.text)
        elif t.is_image:
            image = traj.images[t.image]
        elif t.role == "inspect":
            yield plan, image, "inconsistent" not in t.text


def stream_diagnostics(run: Path) -> dict[str, float]:
    """Where a PSIR run's images go wrong. Fractions of its streams: `no_image` (the stream drew nothing),
    `format_failure` (it broke the format after its first turn), `plan_ok` (its last plan's <des> is exactly the
    prompt's scene, by data_gen's plan judge), `draws_plan` (its final image shows its own last <des>: drawing, not
    planning), `first_right` / `final_right` (its first / final image shows the prompt's scene: does the loop
    improve the first draft?), `overplans` (its first <des> names more objects than the prompt). Fractions of its
    inspect turns: `says_consistent` (the verdict is "consistent"), `inspect_right` (the verdict agrees with the
    judge on the image before it against the <des> of its plan)."""
    from data_gen.backends.shapes import plan_problems
    from eval.run_dir import load_trajectory, read_jsonl
    from scene_graphs.shapes import check, parse_prompt

    counts = dict.fromkeys(STREAM_KEYS, 0)
    inspects = 0
    records = read_jsonl(run / "records.jsonl")
    for rec in records:
        traj = load_trajectory(run / rec["trajectory"]) if rec.get("trajectory") else None
        counts["no_image"] += traj is None or traj.final_image() is None
        if traj is None:
            continue
        counts["format_failure"] += traj.meta.get("stop_reason") == "format_failure"
        wanted = parse_prompt(rec["prompt"])
        images = [traj.images[t.image] for t in traj.turns if t.is_image]
        if images:
            counts["first_right"] += check(images[0], wanted).consistent
            counts["final_right"] += check(images[-1], wanted).consistent
        plans = [planned_scene(t.text) for t in traj.turns if t.role == "plan"]
        if plans and plans[0] is not None:
            counts["overplans"] += len(plans[0].objects) > len(wanted.objects)
        for plan, image, says in inspected_drafts(traj):
            inspects += 1
            counts["says_consistent"] += says
            counts["inspect_right"] += plan is not None and image is not None and says == check(image, plan).consistent
        if plans and plans[-1] is not None:
            counts["plan_ok"] += not plan_problems(plans[-1], wanted, final=True)
            counts["draws_plan"] += bool(images) and check(images[-1], plans[-1]).consistent
    per = {"says_consistent": inspects, "inspect_right": inspects}
    return {k: v / max(per.get(k, len(records)), 1) for k, v in counts.items()}


def spread(per_seed: dict[int, dict]) -> dict[str, dict[str, float]]:
    """{key: {mean, half_range, values}} for overall, every category and every sub-accuracy."""
    values: dict[str, list[float]] = {}
    for s in per_seed.values():
        values.setdefault("overall", []).append(s["overall"])
        for c, v in s["categories"].items():
            values.setdefault(c, []).append(v["score"])
        for c, v in s["subscores"].items():
            values.setdefault(f"sub:{c}", []).append(v["score"])
    return {k: {"mean": sum(v) / len(v), "half_range": (max(v) - min(v)) / 2, "values": v} for k, v in values.items()}


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: sum(d.get(k, 0.0) for d in dicts) / len(dicts) for k in keys}


def markdown(results: dict[str, Any]) -> str:
    """The tables: accuracy in % as mean over seeds [95% bootstrap interval over prompts]; sub-accuracies as
    mean ± half the range over seeds."""

    def cell(row: dict, key: str) -> str:
        v, ci = row["scores"].get(key), row.get("ci", {}).get(key)
        if v is None:
            return "—"
        return f"{100 * v['mean']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else f"{100 * v['mean']:.1f}"

    def sub(row: dict, key: str) -> str:
        v = row["scores"].get(key)
        return "—" if v is None else f"{100 * v['mean']:.1f} ± {100 * v['half_range']:.1f}"

    rows = results["rows"]
    cats = [k for k in (rows[0]["scores"] if rows else {}) if k != "overall" and not k.startswith("sub:")]
    head = ["arm", "mode", "overall", "position", "color_attr", "sub: shape", "sub: position", "sub: color",
            "images / prompt", "Euler steps / prompt", "train tokens (per seed)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cost = row["cost"]
        tokens = ", ".join(f"{t['tokens']:,}" for t in row["train"].values()) if row["train"] else "—"
        lines.append("| " + " | ".join([row["arm"], row["mode"], cell(row, "overall"), cell(row, "position"),
                                        cell(row, "color_attr"), sub(row, "sub:shape"), sub(row, "sub:position"),
                                        sub(row, "sub:color"), f"{cost.get('images', 0):.2f}",
                                        f"{cost.get('flow_steps', 0):.0f}", tokens]) + " |")  # fmt: skip
    psir = [row for row in rows if row["streams"]]
    if psir:
        keys = [k for k in STREAM_KEYS if all(k in row["streams"] for row in psir)]  # older results lack some
        lines += ["", "| arm | PSIR streams: " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        lines += [
            f"| {row['arm']} | " + " | ".join(f"{100 * row['streams'][k]:.0f}%" for k in keys) + " |" for row in psir
        ]
    lines += ["", "| arm | mode | " + " | ".join(cats) + " |", "|" + "---|" * (len(cats) + 2)]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['mode']} | " + " | ".join(cell(row, c) for c in cats) + " |")
    return "\n".join(lines) + "\n"


def merge_runs(outs: list[str | Path], dest: str | Path) -> dict[str, Any]:
    """One table from reproductions run in parallel, one seed each (same settings but `seeds`): every arm and
    eval of seed s is read from the run that has it; writes dest/results.json and dest/results.md."""
    roots = [Path(o) for o in outs]
    settings = [json.loads(Layout(r).settings.read_text()) for r in roots]
    same = [{k: v for k, v in s.items() if k != "seeds"} for s in settings]
    if any(x != same[0] for x in same[1:]):
        diff = sorted({k for x in same[1:] for k in x if x[k] != same[0].get(k)})
        raise DemoError(f"merge: the runs differ in {diff}; only their seeds may differ")
    owner = {seed: root for root, st in zip(roots, settings, strict=True) for seed in st["seeds"]}
    fields = {f.name for f in dataclasses.fields(ReproSettings)}
    merged = ReproSettings(**{k: v for k, v in same[0].items() if k in fields}, seeds=sorted(owner), out=dest)

    class Merged(Repro):
        def arm_dir(self, arm: str, seed: int) -> Path:
            return owner[seed] / "arms" / f"{arm}-s{seed}"

        def eval_dir(self, arm: str, seed: int, mode: str) -> Path:
            return owner[seed] / "eval" / f"{arm}-s{seed}-{mode}"

    results = collect(Merged(merged))
    results["runs"] = {str(seed): str(root) for seed, root in owner.items()}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (dest / "results.md").write_text(markdown(results))
    return results


# ---- entry point ------------------------------------------------------------------------------------------
def run_reproduction(s: ReproSettings, until: str | None = None, redo: str | None = None, log=print) -> list[str]:
    import torch

    torch.set_num_threads(s.threads)
    r = Repro(s, log)
    r.root.mkdir(parents=True, exist_ok=True)
    check_settings(Layout(r.root).settings, s.identity(), ReproSettings(out="").identity())
    return run_phases(phases(s), r.root, r, until, redo, log)


def main(argv: list[str] | None = None) -> int:
    d = ReproSettings(out="")
    ap = argparse.ArgumentParser(prog="python -m demo.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", required=True, help="reproduction folder (an existing one is resumed)")
    ap.add_argument("--base", default=None, help="base checkpoint (default: the shipped checkpoints/shapes-base)")
    ap.add_argument("--config", default=str(TRAIN_CONFIG), help="trainer YAML shared by the arms (%(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override, every arm")
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per arm (%(default)s)")
    ap.add_argument("--prompts", type=int, default=d.prompts, help="trajectory / alignment prompts (%(default)s)")
    ap.add_argument("--critique-prompts", type=int, default=d.critique_prompts, help="drafted prompts (%(default)s)")
    ap.add_argument("--critiques", choices=("self", "drafter"), default=d.critiques, help="critique drafts' source")
    ap.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated seeds (%(default)s)")
    ap.add_argument("--arms", default=",".join(d.arms), help="comma-separated arms to train (%(default)s)")
    ap.add_argument("--data-set", action="append", default=[], metavar="KEY=VALUE",
                    help="data_gen config override (repeatable), e.g. --data-set pipeline.edit_prob=0")  # fmt: skip
    ap.add_argument("--infer-set", action="append", default=[], metavar="KEY=VALUE",
                    help="inference override for every eval (repeatable), e.g. --infer-set options.flow.cfg_text_scale=2")  # fmt: skip
    ap.add_argument("--eval-limit", type=int, default=d.eval_limit, help="prompts per category (%(default)s)")
    ap.add_argument("--eval-set", choices=EVAL_SETS, default=d.eval_set,
                    help="score on ShapesEval, or on generated validation prompts (to choose settings)")  # fmt: skip
    ap.add_argument("--replay", type=float, default=d.replay, help="share of base records in every arm (%(default)s)")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (%(default)s)")
    ap.add_argument("--merge", default=None, metavar="OUT1,OUT2,...",
                    help="write --out/results.md from runs made in parallel, one seed each (no training)")  # fmt: skip
    ap.add_argument("--until", default=None, help="stop after this phase")
    ap.add_argument("--redo", default=None, help="redo this phase and every later one")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    if a.merge:
        try:
            print(markdown(merge_runs(a.merge.split(","), a.out)))
        except DemoError as e:
            print(f"demo.reproduce: {e}", file=sys.stderr)
            return 1
        return 0
    s = ReproSettings(out=a.out, base=a.base, train_config=a.config, train_overrides=list(a.set), steps=a.steps,
                      prompts=a.prompts, critique_prompts=a.critique_prompts, critiques=a.critiques,
                      seeds=[int(x) for x in a.seeds.split(",")], arms=a.arms.split(","),
                      data_overrides=list(a.data_set), inference_overrides=list(a.infer_set), eval_limit=a.eval_limit,
                      eval_set=a.eval_set, replay=a.replay, threads=a.threads,
                      progress=not a.quiet)  # fmt: skip
    try:
        run_reproduction(s, a.until, a.redo)
    except DemoError as e:
        print(f"demo.reproduce: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
