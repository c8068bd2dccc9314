"""The demo's phases, each resumable: data -> train -> psir -> eval (base, fine-tuned) -> report.

    from demo.pipeline import DemoSettings, run_demo
    run_demo(DemoSettings(out="runs/demo"))         # == bagel-ft demo --out runs/demo

  phase            what it does (through the projects' public APIs)                  output under OUT
  data             data_gen's three offline pipelines on shapes prompts (ShapesEval's data/{trajectories,
                   prompts and the psir phase's are held out), at the base's canvas  critiques,alignment}
  train            training.trainer on configs/train/demo_psir.yaml from the base   train/ (export/: EMA)
  psir             the fine-tuned model's PSIR loop on held-out prompts, judged     psir/ (*.traj, records)
  eval_base        ShapesEval (eval.shapes_eval), base model, single pass           eval/base-single/
  eval_ft_single   ShapesEval, fine-tuned model, single pass                        eval/finetuned-single/
  eval_ft_psir     ShapesEval, fine-tuned model, PSIR loop                          eval/finetuned-psir/
  report           demo.report: strips, scores, loss curves in one HTML file        report.html, report.md

Resume. A phase is finished iff OUT/phases/<name>.json exists; it is written atomically (temporary file +
rename) after the phase's outputs, holding its wall time and result. A re-run skips finished phases; an
unfinished phase continues from what it left: data_gen skips finished chunks, the trainer resumes from its
latest complete checkpoint (run.resume=auto), eval keeps every image already on disk, psir every saved
trajectory. `redo=PHASE` deletes that phase's and all later phases' outputs and markers first. The settings
that shape results are recorded in OUT/demo.json; re-running OUT with different ones is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / "checkpoints" / "shapes-base"
TRAIN_CONFIG = REPO / "configs" / "train" / "demo_psir.yaml"
PIPELINES = ("trajectories", "critiques", "alignment")  # data_gen's pipelines = the data/ subfolders
HELD_OUT_SEED = 20260417  # prompt seed of the psir phase's held-out prompts


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says what to do."""


@dataclass
class DemoSettings:
    """Everything `bagel-ft demo` takes (its flags map one to one onto these fields)."""

    out: str | Path  # the demo folder (re-run with the same one to resume)
    base: str | Path | None = None  # base checkpoint (official layout); None = the shipped checkpoints/shapes-base
    train_config: str | Path = TRAIN_CONFIG  # the trainer YAML
    train_overrides: list[str] = field(default_factory=list)  # dotted trainer overrides, e.g. train.steps=50
    prompts: int = 320  # shapes prompts per data pipeline (the alignment pipeline makes 3 records per prompt)
    data_seed: int = 0  # data_gen run seed: prompts and every per-prompt seed
    psir_prompts: int = 6  # held-out prompts the psir phase draws (trajectory strips in the report)
    replay: float = 0.0  # share of the fine-tune's mixture given to base records (`with_replay`), 0 = none
    eval_limit: int = 3  # ShapesEval prompts per category (the first ones of the fixed set)
    eval_subset: list[str] | None = None  # ShapesEval categories (None = all ten)
    eval_n: int = 1  # samples per ShapesEval prompt
    eval_seed: int = 0  # ShapesEval base seed (sample s of prompt i: seed + 1000 i + s)
    inference_overrides: list[str] = field(default_factory=list)  # dotted, e.g. options.flow.num_timesteps=11
    threads: int = 1  # torch CPU threads: tiny ops gain nothing from more, and oversubscribed cores cost 20x
    progress: bool = True  # tqdm bars (with ETA) in every phase

    def identity(self) -> dict[str, Any]:
        """The fields that shape results (a resumed OUT must agree on them)."""
        d = dataclasses.asdict(self)
        for k in ("out", "threads", "progress"):
            d.pop(k)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# ---- where things are ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The demo folder; the one place its paths are spelled (demo.report reads it too)."""

    root: Path

    @property
    def settings(self) -> Path:
        return self.root / "demo.json"

    def marker(self, phase: str) -> Path:
        return self.root / "phases" / f"{phase}.json"

    def data(self, pipeline: str = "") -> Path:
        return self.root / "data" / pipeline if pipeline else self.root / "data"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def export(self) -> Path:  # the trainer's EMA export (train.export_ema)
        return self.train / "export"

    @property
    def psir(self) -> Path:
        return self.root / "psir"

    def eval(self, name: str = "") -> Path:
        return self.root / "eval" / name if name else self.root / "eval"

    @property
    def inference_config(self) -> Path:  # the inference YAML every phase draws with (bagel-ft eval --inference-config)
        return self.root / "inference.yaml"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


def find_base(base: str | Path | None) -> Path:
    """`base`, or the shipped checkpoints/shapes-base (beside the package, else under the working directory)."""
    candidates = (
        [Path(base)] if base else list(dict.fromkeys([DEFAULT_BASE, Path.cwd() / "checkpoints" / "shapes-base"]))
    )
    for c in candidates:
        if (c / "ema.safetensors").is_file():
            return c
    raise DemoError(
        f"no base checkpoint at {' or '.join(map(str, candidates))}. Build the shapes base with "
        "`python -m demo.base_model --out checkpoints/shapes-base` (see docs/results.md) or pass --base DIR."
    )


# ---- prompts -----------------------------------------------------------------------------------------------------
def eval_prompt_texts() -> set[str]:
    from scene_graphs.shapes import shapes_eval_prompts

    return {p.text for p in shapes_eval_prompts()}


def training_prompts(num: int, seed: int, exclude: set[str]) -> list[str]:
    """`num` distinct shapes-grammar prompts (data_gen's generator, all categories), none of `exclude`."""
    from data_gen.runner import shapes_prompts

    m = num
    while True:
        kept = [t for t in shapes_prompts(m, seed, None) if t not in exclude]
        if len(kept) >= num or m >= 64 * num:
            return kept[:num]
        m *= 2


def held_out_prompts(num: int, exclude: set[str], seed: int = HELD_OUT_SEED) -> list:
    """`num` ShapesPrompts (categories in round robin) outside `exclude` (training + ShapesEval prompts)."""
    from scene_graphs.shapes import CATEGORIES, generate_prompts

    by_cat: dict[str, list] = {c: [] for c in CATEGORIES}
    for p in generate_prompts(40 * len(CATEGORIES), seed):
        if p.text not in exclude and p.text not in {q.text for q in by_cat[p.tag]}:
            by_cat[p.tag].append(p)
    rows = [by_cat[c] for c in CATEGORIES]
    return [row[i] for i in range(max(map(len, rows))) for row in rows if i < len(row)][:num]


# ---- the pieces phases (and demo.reproduce) share ------------------------------------------------------------------
def data_config(canvas: int, overrides: list[str] = ()):
    """data_gen's offline shapes-world config at the model's canvas."""
    from data_gen.config import load_config

    return load_config(None, [f"pipeline.image_size={canvas}", *overrides])


def build_subset(pipeline: str, prompts: list[str], out: Path, cfg, seed: int) -> dict[str, Any]:
    """One data_gen pipeline over `prompts` into `out` (resumes by chunk) -> its totals; raises when incomplete."""
    from data_gen import alignment, critiques, trajectories
    from data_gen.runner import run_pipeline

    module = {"trajectories": trajectories, "critiques": critiques, "alignment": alignment}[pipeline]
    run = run_pipeline(module.NAME, module.build, cfg, prompts, out, seed=seed, with_sampler=module is critiques)
    result = asyncio.run(run)
    if not result.complete:
        raise DemoError(f"data {pipeline}: some prompts failed ({result.total.to_dict()['failed']}); re-run to retry")
    return result.total.to_dict()


def inference_config(overrides: list[str] = ()) -> dict[str, Any]:
    """The inference YAML (eval's `load:` / `options:`) of every phase: the base model's flow settings
    (demo.base_model.FlowDefaults; height/width 0: the largest image the model draws, its canvas) and PSIR
    budgets that fit the data's longest trajectory, then dotted `overrides` (values parsed as YAML; eval checks the field names)."""
    import yaml

    from data_gen.config import PipelineConfig
    from demo.base_model import FlowDefaults

    f = FlowDefaults()
    images = PipelineConfig().max_steps + 1  # the longest plan, and one refine
    config = {
        "options": {
            "flow": {"height": 0, "width": 0, "num_timesteps": f.num_timesteps,
                     "timestep_shift": f.timestep_shift, "cfg_text_scale": f.cfg_text_scale,
                     "cfg_interval": list(f.cfg_interval)},
            "text": {"max_tokens": 256},  # bytes: the longest plan turn is ~200
            "budget": {"max_images": images, "max_steps": 2 * images + 2, "max_tokens": 3072},
        }
    }  # fmt: skip
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise DemoError(f"inference override {item!r}: expected options.SECTION.FIELD=VALUE")
        *parents, name = key.strip().split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = yaml.safe_load(value)
    return config


def shapes_eval_run(
    ckpt: Path,
    mode: str,
    out: Path,
    inference: dict,
    limit: int | None,
    n: int,
    seed: int,
    label: str,
    subset: list[str] | None = None,
    progress: bool = True,
    generator=None,
    prompts: list[dict] | None = None,
) -> dict[str, Any]:
    """An eval run directory (as `bagel-ft eval shapes` writes it; resumes image by image) -> its summary.
    `prompts`: prompt dicts to draw instead of ShapesEval's (`eval.shapes_eval.as_eval_prompts`, e.g. a
    validation set); `limit` / `subset` select among them the same way."""
    from eval import shapes_eval
    from eval.generator import InferenceGenerator
    from eval.run_dir import prepare_run_dir

    config = {"benchmark": "shapes", "ckpt": str(ckpt), "mode": mode, "n": n, "seed": seed, "limit": limit,
              "subset": subset, "label": label, "judge": None, "inference": inference, "generator": f"inference:{mode}",
              "argv": ["demo"], "created": _now()}  # fmt: skip
    prepare_run_dir(out, config)
    generator = generator or InferenceGenerator(str(ckpt), mode, config=inference)
    prompts = shapes_eval.select_prompts(prompts or shapes_eval.load_prompts(), subset, limit)
    shapes_eval.generate_shapes(generator, prompts, out, n=n, seed=seed, progress=progress)
    return shapes_eval.score_shapes(out, prompts, n=n, progress=False)


REPLAY_SEED = 101  # demo.base_data seed of the replayed base records (not the base's own seed 1)
REPLAY_RECORDS = 4000  # replayed base records in all, split over the unified mixture's tasks by weight


def replay_tasks() -> dict[str, float]:
    """task -> weight of the base's unified mixture (configs/train/shapes_unified.yaml): what replay draws from."""
    from demo.base_model import UNIFIED_CONFIG
    from training.config import load_config

    return {Path(s.path).name: s.weight for s in load_config(UNIFIED_CONFIG).data.sources}


def write_replay(out: Path, canvas: int) -> int:
    """REPLAY_RECORDS base records (`demo.base_data`, seed REPLAY_SEED), split over the tasks by weight."""
    from demo.base_data import write_base_data

    tasks = replay_tasks()
    total = sum(tasks.values())
    counts = {task: max(1, round(REPLAY_RECORDS * w / total)) for task, w in tasks.items()}
    write_base_data(out, counts, canvas, seed=REPLAY_SEED, log=lambda *_: None)
    return sum(counts.values())


def with_replay(sources: list[dict], replay: float) -> list[dict]:
    """`sources` (weights summing to 1) scaled to 1 - `replay`, plus the replayed base tasks (data/replay/<task>,
    written by `write_replay`) sharing `replay` by the unified mixture's weights."""
    if replay <= 0:
        return sources
    tasks = replay_tasks()
    total = sum(tasks.values())
    return [{**src, "weight": src["weight"] * (1 - replay)} for src in sources] + [
        {"path": f"data/replay/{task}", "weight": replay * w / total} for task, w in tasks.items()
    ]


def training_summary(run_dir: Path) -> dict[str, Any]:
    """Steps, tokens seen (sum of packed sequence lengths), supervised tokens, and the last losses of a run."""
    from training.metrics import read_metrics

    rows = [r for _, r in sorted(read_metrics(run_dir).items())]
    if not rows:
        return {"steps": 0}
    tail = rows[-min(10, len(rows)) :]
    return {
        "steps": rows[-1]["step"],
        "tokens": sum(r["tokens"] for r in rows),
        "ce_tokens": sum(r["ce_tokens"] for r in rows),
        "mse_tokens": sum(r["mse_tokens"] for r in rows),
        "final_ce": sum(r["ce"] for r in tail) / len(tail),
        "final_mse": sum(r["mse"] for r in tail) / len(tail),
        "step_time_s": sum(r["step_time_s"] for r in rows) / len(rows),
    }


def base_geometry(base: Path):
    """The image sizes `base` takes: its `image_geometry.json` (the sizes it was trained at) within its tables."""
    from bagel_ft.config import BagelConfig
    from bagel_ft.transforms import ImageGeometry

    return ImageGeometry.from_dir(base).within(BagelConfig.from_dir(base))


def base_canvas(base: Path) -> int:
    """The side (px) `base` draws: its VAE size within its latent table (`base_geometry`)."""
    return base_geometry(base).vae_max_size


def train_config(path: str | Path, overrides: list[str], root: Path, base: Path, threads: int, progress: bool = True):
    """The trainer's Config: YAML + dotted overrides, then run.dir and relative source paths rebased on `root`,
    model.path = `base`, train.num_threads = `threads`; images at the base's canvas (`base_canvas`; the ViT's
    within its position table) unless an override sets their sizes."""
    from training.config import load_config, validate

    cfg = load_config(path, overrides)
    g = base_geometry(base)
    side, vit_side = g.vae_max_size, min(g.vae_max_size, g.vit_max_size)
    sizes = {"vae_max_size": side, "vae_min_size": side, "vit_max_size": vit_side, "vit_min_size": vit_side}
    for name, value in sizes.items():
        if not any(o.startswith(f"data.{name}=") for o in overrides):
            setattr(cfg.data, name, value)
    cfg.run.dir = str(root / cfg.run.dir)
    for s in cfg.data.sources:
        s.path = str(root / s.path)
    cfg.model.path = str(base)
    cfg.train.num_threads = threads
    cfg.train.progress_bar = cfg.train.progress_bar and progress
    validate(cfg)
    return cfg


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- the phases ------------------------------------------------------------------------------------------------
class Demo:
    """Settings resolved once (base checkpoint, canvas, prompts), shared by the phases."""

    def __init__(self, settings: DemoSettings, log: Callable[[str], None] = print):
        self.s, self.log = settings, log
        self.layout = Layout(Path(settings.out))
        self.base = find_base(settings.base)
        self.inference = inference_config(settings.inference_overrides)
        self.canvas = base_canvas(self.base)  # the side (px) the base draws and was trained at
        self._generators: dict[str, Any] = {}

    def prompts(self) -> tuple[list[str], list]:
        """(training prompts, held-out ShapesPrompts): both disjoint from ShapesEval and from each other."""
        held_back = eval_prompt_texts()
        train = training_prompts(self.s.prompts, self.s.data_seed, held_back)
        return train, held_out_prompts(self.s.psir_prompts, held_back | set(train))

    def generator(self, mode: str):
        """eval's InferenceGenerator of the fine-tuned export (loaded once, mode switched without reload)."""
        from eval.generator import InferenceGenerator

        if "ft" not in self._generators:
            self._generators["ft"] = InferenceGenerator(str(self.layout.export), mode, config=self.inference)
        return self._generators["ft"].with_mode(mode)

    def psir_generator(self):
        """inference's Generator of the fine-tuned export (the whole Result: the stream's steps and failures)."""
        from eval.generator import dataclass_from_dict
        from inference import GenerateOptions, Generator

        if "psir" not in self._generators:
            options = dataclass_from_dict(GenerateOptions, {**self.inference["options"], "mode": "psir"})
            self._generators["psir"] = Generator.from_pretrained(self.layout.export, options)
        return self._generators["psir"]


def phase_data(demo: Demo) -> dict[str, Any]:
    prompts, _ = demo.prompts()
    cfg = data_config(demo.canvas)
    totals = {}
    for name in PIPELINES:
        t = build_subset(name, prompts, demo.layout.data(name), cfg, demo.s.data_seed)
        totals[name] = {"records": t["kept"], "prompts": t["items"], "rejected": t["rejected"]}
        demo.log(f"  data {name}: {t['kept']} records from {t['items']} prompts (rejected {t['rejected']})")
    if demo.s.replay > 0:
        totals["replay"] = {"records": write_replay(demo.layout.data("replay"), demo.canvas)}
    return {"prompts": len(prompts), "canvas": demo.canvas, "subsets": totals}


def phase_train(demo: Demo) -> dict[str, Any]:
    from training.trainer import train

    overrides = list(demo.s.train_overrides)
    if demo.s.replay > 0:
        from training.config import load_config

        own = [dataclasses.asdict(src) for src in load_config(demo.s.train_config, overrides).data.sources]
        overrides.append(f"data.sources={json.dumps(with_replay(own, demo.s.replay))}")
    cfg = train_config(demo.s.train_config, overrides, demo.layout.root, demo.base, demo.s.threads, demo.s.progress)
    if Path(cfg.run.dir) != demo.layout.train:
        raise DemoError(f"run.dir must stay 'train' in the demo (the layout reads it), got {cfg.run.dir}")
    train(cfg)
    return training_summary(demo.layout.train)


def phase_psir(demo: Demo) -> dict[str, Any]:
    """The PSIR loop on held-out prompts: each stream saved (resumable; its decoded steps and any format failure
    in the record, so the report shows what the model wrote even when it broke the format), final image judged."""
    from tqdm import tqdm

    from eval.run_dir import clean_tmp, save_trajectory, write_json_atomic, write_jsonl_atomic
    from scene_graphs.shapes import check

    out = demo.layout.psir
    out.mkdir(parents=True, exist_ok=True)
    clean_tmp(out)
    _, prompts = demo.prompts()
    records = []
    for i, p in enumerate(tqdm(prompts, desc="psir", disable=not demo.s.progress)):
        key, seed = f"{i:03d}", demo.s.eval_seed + i
        if not (out / f"{key}.json").is_file():
            result = demo.psir_generator().generate(p.text, mode="psir", seed=seed)
            traj = result.trajectory
            verdict = check(result.image, p.graph) if result.image is not None else None
            if traj.turns:
                save_trajectory(out / f"{key}.traj", traj)
            rec = {"key": key, "prompt": p.text, "category": p.tag, "seed": seed,
                   "correct": bool(verdict and verdict.consistent),
                   "reasons": list(verdict.reasons) if verdict else ["no image: the stream drew nothing"],
                   "cost": dataclasses.asdict(result.cost), "trajectory": f"{key}.traj" if traj.turns else None,
                   "stop_reason": traj.meta.get("stop_reason"), "failure": traj.meta.get("failure")}  # fmt: skip
            write_json_atomic(out / f"{key}.json", rec)
        records.append(json.loads((out / f"{key}.json").read_text()))
    write_jsonl_atomic(out / "records.jsonl", records)
    return {"prompts": len(records), "correct": sum(r["correct"] for r in records),
            "format_failures": sum(r["failure"] is not None for r in records),
            "images_per_prompt": sum(r["cost"]["images"] for r in records) / max(len(records), 1)}  # fmt: skip


EVAL_RUNS = {  # phase -> (eval run name, checkpoint, mode)
    "eval_base": ("base-single", "base", "single"),
    "eval_ft_single": ("finetuned-single", "finetuned", "single"),
    "eval_ft_psir": ("finetuned-psir", "finetuned", "psir"),
}


def phase_eval(phase: str) -> Callable[[Demo], dict[str, Any]]:
    name, which, mode = EVAL_RUNS[phase]

    def run(demo: Demo) -> dict[str, Any]:
        s = demo.s
        ckpt = demo.base if which == "base" else demo.layout.export
        gen = demo.generator(mode) if which == "finetuned" else None
        summary = shapes_eval_run(ckpt, mode, demo.layout.eval(name), demo.inference, s.eval_limit, s.eval_n,
                                  s.eval_seed, name, s.eval_subset, s.progress, gen)  # fmt: skip
        demo.log(f"  {name}: overall {summary['overall']:.3f} over {summary['total_images']} images")
        return {"overall": summary["overall"], "images": summary["total_images"],
                "cost_per_sample": summary["cost_per_sample"]}  # fmt: skip

    return run


def phase_report(demo: Demo) -> dict[str, Any]:
    from demo.report import write_report

    page = write_report(demo.layout.root)
    return {"report": str(page), "bytes": page.stat().st_size}


@dataclass(frozen=True)
class Phase:
    name: str
    title: str
    run: Callable[[Demo], dict[str, Any]]
    outputs: Callable[[Path], list[Path]]  # what `redo` deletes, given the folder


PHASES = (
    Phase("data", "shapes-world dataset: trajectories, critiques, alignment", phase_data,
          lambda root: [Layout(root).data()]),
    Phase("train", "PSIR fine-tune of the base model", phase_train, lambda root: [Layout(root).train]),
    Phase("psir", "PSIR loop on held-out prompts", phase_psir, lambda root: [Layout(root).psir]),
    *(Phase(p, f"ShapesEval: {EVAL_RUNS[p][0]}", phase_eval(p), lambda root, p=p: [Layout(root).eval(EVAL_RUNS[p][0])])
      for p in EVAL_RUNS),
    Phase("report", "report.html", phase_report, lambda root: [Layout(root).report, root / "report.md"]),
)  # fmt: skip
PHASE_NAMES = tuple(p.name for p in PHASES)


def check_settings(path: Path, now: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Record `now` (a settings identity) at `path` in a new folder; refuse a folder made with other settings
    (a key recorded by an older version is taken at its default)."""
    from eval.run_dir import write_json_atomic

    if path.is_file():
        old = {**defaults, **json.loads(path.read_text())}
        diff = {k: (old.get(k), v) for k, v in now.items() if old.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise DemoError(f"{path.parent} was made with other settings ({detail}); use another --out")
    write_json_atomic(path, now)


def run_phases(
    phases: Sequence[Phase],
    root: Path,
    ctx: Any,
    until: str | None = None,
    redo: str | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run `phases` in order on `ctx`, skipping those with a marker under ROOT/phases (module doc), after deleting
    `redo`'s and later phases' outputs and markers; stop after `until` -> the names of the phases that ran now."""
    from eval.run_dir import write_json_atomic

    names = [p.name for p in phases]
    for name in (until, redo):
        if name is not None and name not in names:
            raise DemoError(f"unknown phase {name!r}; expected one of {names}")
    if redo is not None:
        for phase in phases[names.index(redo) :]:
            for path in [Layout(root).marker(phase.name), *phase.outputs(root)]:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    ran, start = [], time.time()
    for k, phase in enumerate(phases, 1):
        head = f"[{k}/{len(phases)}] {phase.name}"
        marker = Layout(root).marker(phase.name)
        if marker.is_file():
            log(f"{head}: finished before ({json.loads(marker.read_text())['seconds']:.0f} s), skipped")
        else:
            log(f"{head}: {phase.title}")
            t0 = time.time()
            result = phase.run(ctx)
            seconds = time.time() - t0
            write_json_atomic(marker, {"phase": phase.name, "seconds": round(seconds, 1), "finished": _now(),
                                       "result": result})  # fmt: skip
            ran.append(phase.name)
            log(f"{head}: done in {seconds:.0f} s")
        if phase.name == until:
            break
    log(f"{len(ran)} phase(s) ran in {time.time() - start:.0f} s")
    return ran


def run_demo(
    settings: DemoSettings, until: str | None = None, redo: str | None = None, log: Callable[[str], None] = print
) -> list[str]:
    """Run the demo's phases not finished yet (up to `until`; `redo` and later ones again) -> the phases that ran."""
    import torch

    torch.set_num_threads(settings.threads)
    demo = Demo(settings, log)
    layout = demo.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    check_settings(layout.settings, settings.identity(), DemoSettings(out="").identity())
    layout.inference_config.write_text(_yaml(demo.inference))
    ran = run_phases(PHASES, layout.root, demo, until, redo, log)
    log(f"demo report: {layout.report}")
    return ran


def _yaml(data: dict) -> str:
    import yaml

    return "# written by `bagel-ft demo`: bagel-ft eval shapes --inference-config THIS_FILE ...\n" + yaml.safe_dump(
        data, sort_keys=False
    )
