"""Rebuild the shapes-world base model (`checkpoints/shapes-base`) end to end: the BAGEL release's analog.

    python -m demo.base_model --out checkpoints/shapes-base            # the shipped checkpoint (~2.5 h, 1 core)
    python -m demo.base_model --out runs/try --work runs/try-work --steps 200 --unified-steps 200 --t2i 2000 \
        --caption 400 --edit 2000 --verdict 1000 --chat 400 --ae-steps 200   # a smoke run of every stage

Stages (each skips itself when its output exists in `--work`, so a stopped run continues where it was):
  1. autoencoder  `demo.autoencoder` trains the tiny FLUX AE (architecture: the model config's
                  vae_config.json; latent normalisation fitted)                       -> WORK/ae
  2. data         `demo.base_data` writes every task of `demo.base_tasks` (t2i, caption, text, edit,
                  verdict, chat) at the AE's canvas, one folder per task               -> WORK/data
  3. tokenizer    a byte-level BPE (`bagel_ft.tokenizer.train_bpe_tokenizer`) trained on the base data's
                  texts, vocabulary <= the model config's vocab_size                   -> WORK/tokenizer
  4. init         random Bagel weights (seed `--seed`) of the model config + the trained AE + that
                  tokenizer, saved in the official layout                              -> WORK/init
  5. pretrain     the project trainer (`training.trainer.train`, i.e. `bagel-ft train`) on
                  configs/train/shapes_base.yaml from WORK/init: draw, describe, read   -> WORK/pretrain
  6. unified      the trainer on configs/train/shapes_unified.yaml from stage 5's export: every task of
                  the unified mixture (BAGEL's capability mix: draw, edit, judge, describe, chat) -> WORK/run
  7. export       stage 6's EMA export copied to `--out` (configs, ema.safetensors, ae.safetensors, tokenizer)
  8. evaluate     ShapesEval prompts (`--eval-per-category` per category, one sample each) drawn by
                  `inference` in single mode, judged by `eval.shapes_eval.score_images` -> WORK/eval.json
                  and `bagel-ft eval skills` (t2i / edit / verdict / caption)          -> WORK/skills

Two stages, as BAGEL's own pretraining had several: stage 6 starts from a model that already draws, reads a
prompt and describes a picture, and learns to edit and judge on top (docs/results.md, "Unified base"). The
model config is `configs/model/shapes_base/` (the four official config files; read with
`BagelConfig.from_dir`): BAGEL's architecture unchanged at a tiny size — see docs/results.md "Shapes base
model" for the trials behind every choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from bagel_ft.checkpoint import load_autoencoder
from bagel_ft.config import BagelConfig, VAEConfig
from bagel_ft.modeling import Bagel
from bagel_ft.tokenizer import load_tokenizer, train_bpe_tokenizer
from bagel_ft.transforms import ImageGeometry
from common.config import to_dict
from demo.base_data import DEFAULT_COUNTS
from inference.settings import save_checkpoint_options

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG = REPO / "configs/model/shapes_base"
TRAIN_CONFIG = REPO / "configs/train/shapes_base.yaml"  # stage 5: draw, describe, read
UNIFIED_CONFIG = REPO / "configs/train/shapes_unified.yaml"  # stage 6: the unified mixture


@dataclasses.dataclass
class FlowDefaults:
    """How the base model draws at evaluation (inference.FlowSettings fields; chosen by the trials)."""

    num_timesteps: int = 26  # schedule points incl. t = 0: 25 Euler steps
    timestep_shift: float = 1.0
    # no guidance: text CFG 4 turns the unified base's edits (and so every PSIR draft after the first) into
    # fragmented textures, and single-pass images are no better with it (docs/results.md, "Unified base")
    cfg_text_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)


# ---- stages -------------------------------------------------------------------------------------------


def model_config(model_dir: str | Path = MODEL_CONFIG, ae_dir: str | Path | None = None) -> BagelConfig:
    """The model config; with `ae_dir`, its vae section is the trained AE's (fitted normalisation)."""
    cfg = BagelConfig.from_dir(model_dir)
    if ae_dir is not None:
        cfg.vae = VAEConfig(**json.loads((Path(ae_dir) / "vae_config.json").read_text()))
        cfg.validate(str(ae_dir))
    return cfg


@torch.no_grad()
def standardize_timestep_embedder(model: Bagel, min_std: float = 0.01) -> None:
    """Fold a standardisation of the timestep frequency features into `time_embedder.mlp[0]` (init only).

    BAGEL embeds t in [0, 1] unscaled (`timestep_frequency_embedding`: cos/sin(t f_k), f_k <= 1), so over the
    whole range of t most of the 256 features move by far less than a radian: at the default init the
    embeddings of t = 0.9 and t = 1.0 differ by 2% of their norm and a small model cannot tell pure noise
    from a 10% signal (see docs/results.md). Here each feature with std >= `min_std` over t ~ U[0, 1] is
    mapped to zero mean and unit std before the first Linear (weights / std, bias -= weights . mean); the rest
    (constant to within `min_std`) get zero weight. Same module, same parameter shapes; only the init."""
    from bagel_ft.embeddings import timestep_frequency_embedding

    layer = model.time_embedder.mlp[0]
    t = torch.linspace(0, 1, 1001)
    feats = timestep_frequency_embedding(t, model.time_embedder.frequency_embedding_size)  # [1001, 256]
    mean, std = feats.mean(0), feats.std(0)
    scale = torch.where(std >= min_std, 1 / std, torch.zeros_like(std))
    layer.weight.mul_(scale[None])
    layer.bias.sub_(layer.weight @ mean)


def build_tokenizer(data_dir: str | Path, vocab_size: int):
    """The base's tokenizer: `train_bpe_tokenizer` on every text of the base data (`demo.base_data.base_texts`),
    at most `vocab_size` ids. The PSIR tags stay ordinary text, split into BPE pieces (docs/format.md section 4)."""
    from demo.base_data import base_texts

    return train_bpe_tokenizer(base_texts(data_dir), vocab_size)


def build_init_checkpoint(
    cfg: BagelConfig,
    ae_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    timestep_init: str = "official",
    tokenizer_dir: str | Path = "byte",
) -> Path:
    """Random Bagel weights (official init, seeded; `timestep_init="standardized"`:
    `standardize_timestep_embedder`) + the trained AE + the tokenizer (`load_tokenizer(tokenizer_dir)`), official
    layout."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > cfg.llm.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_dir}: {tokenizer.vocab_size} ids, but the model config's llm vocab_size is "
            f"{cfg.llm.vocab_size}"
        )
    torch.manual_seed(seed)
    model = Bagel(cfg).attach_vae(load_autoencoder(Path(ae_dir) / "ae.safetensors", cfg))
    if timestep_init == "standardized":
        standardize_timestep_embedder(model)
    elif timestep_init != "official":
        raise ValueError(f"timestep_init: expected 'official' or 'standardized', got {timestep_init!r}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def train_overrides(work: Path, steps: int | None, config: str | Path = TRAIN_CONFIG, run: str = "run",
                    init: str | Path = "init") -> list[str]:  # fmt: skip
    """Dotted overrides that point the trainer YAML `config` at this run's folders: each of its data sources
    (`.../data/<task>`, weighted there) moves to WORK/data/<task> (tasks without a data folder are left out),
    run.dir = WORK/<run>, model.path = WORK/<init> (or an absolute `init`)."""
    from training.config import load_config

    sources = []
    for src in load_config(config).data.sources:
        folder = work / "data" / Path(src.path).name
        if folder.is_dir():
            sources.append({**dataclasses.asdict(src), "path": str(folder)})
    out = [f"run.dir={work / run}", f"model.path={work / init}", f"data.sources={json.dumps(sources)}"]
    if steps is not None:
        out.append(f"train.steps={steps}")
    return out


def run_training(config: str | Path, overrides: list[str]) -> None:
    """`bagel-ft train CONFIG overrides...`, in process (the trainer's public entry point)."""
    from training.config import load_config
    from training.trainer import train

    train(load_config(config, overrides))


# ---- evaluation -----------------------------------------------------------------------------------------


def draw_shapes_eval(
    model_or_dir,
    per_category: int = 10,
    flow: FlowDefaults | None = None,
    seed: int = 0,
    canvas: int | None = None,
    tokenizer=None,
):
    """(prompts, images): the first `per_category` ShapesEval prompts of every category, one image each
    (`inference` single mode, seed + prompt index). `model_or_dir`: a checkpoint dir (its tokenizer is used), or
    a loaded `Bagel` with its `tokenizer` (a `bagel_ft.tokenizer` object)."""
    from inference.api import GenerateOptions, Generator
    from inference.engine import Engine, FlowSettings
    from scene_graphs.shapes import shapes_eval_prompts

    if isinstance(model_or_dir, (str, Path)):
        model, tokenizer = Bagel.from_pretrained(model_or_dir), tokenizer or load_tokenizer(model_or_dir)
    elif tokenizer is None:
        raise ValueError("draw_shapes_eval: a loaded model needs its tokenizer (or pass the checkpoint dir)")
    else:
        model = model_or_dir
    side = canvas or model.config.vae.resolution
    f = flow or FlowDefaults()
    settings = FlowSettings(
        height=side,
        width=side,
        num_timesteps=f.num_timesteps,
        timestep_shift=f.timestep_shift,
        cfg_text_scale=f.cfg_text_scale,
        cfg_interval=tuple(f.cfg_interval),
    )
    gen = Generator(Engine(model.eval(), tokenizer), GenerateOptions(mode="single", flow=settings))
    seen: dict[str, int] = {}
    prompts, images = [], []
    for i, p in enumerate(shapes_eval_prompts()):
        seen[p.tag] = seen.get(p.tag, 0) + 1
        if seen[p.tag] > per_category:
            continue
        prompts.append(p)
        images.append(gen.generate(p.text, seed=seed + i).image)
    return prompts, images


def evaluate(
    model_or_dir,
    per_category: int = 10,
    flow: FlowDefaults | None = None,
    seed: int = 0,
    save_dir: str | Path | None = None,
) -> dict:
    """`eval.shapes_eval.score_images` of `draw_shapes_eval`; optionally saves a contact sheet of the images."""
    from eval.shapes_eval import score_images

    t0 = time.time()
    prompts, images = draw_shapes_eval(model_or_dir, per_category, flow, seed)
    summary = score_images(prompts, images)
    summary["draw_seconds"] = round(time.time() - t0)
    if save_dir is not None:
        contact_sheet(images, per_row=per_category).save(Path(save_dir) / "samples.png")
    return summary


def evaluate_checkpoints(work: Path, config: str | Path, overrides: list[str], per_category: int) -> dict:
    """ShapesEval of the EMA weights of every kept checkpoint of WORK/run (trials: accuracy vs steps)."""
    from training.checkpoint import complete_checkpoints
    from training.config import load_config
    from training.export import export_ema

    cfg = load_config(config, overrides)
    out = {}
    for ckpt in complete_checkpoints(work / "run" / "checkpoints"):
        export = work / "ckpt_exports" / ckpt.name
        if not (export / "ema.safetensors").is_file():
            export_ema(cfg, ckpt, export)
        out[ckpt.name] = evaluate(export, per_category, save_dir=export)
        print(ckpt.name, json.dumps({k: out[ckpt.name][k] for k in ("overall", "subscores")}), flush=True)
    return out


def contact_sheet(images, per_row: int = 10):
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // per_row)
    sheet = Image.new("RGB", (per_row * (w + 2), rows * (h + 2)), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % per_row) * (w + 2), (i // per_row) * (h + 2)))
    return sheet


# ---- the recipe ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="the exported base checkpoint (official layout)")
    ap.add_argument("--work", default="runs/shapes-base", help="intermediate outputs (AE, data, init, run, eval)")
    ap.add_argument("--model-config", default=str(MODEL_CONFIG), help="dir of the four official config files")
    ap.add_argument("--train-config", default=str(TRAIN_CONFIG), help="the pretraining stage's trainer YAML")
    ap.add_argument("--unified-config", default=str(UNIFIED_CONFIG), help="the unified stage's trainer YAML")
    ap.add_argument("--steps", type=int, default=None, help="override the pretraining stage's train.steps")
    ap.add_argument("--unified-steps", type=int, default=None, help="override the unified stage's train.steps")
    ap.add_argument("--ae-steps", type=int, default=None, help="override the AE's optimizer steps")
    for task, n in DEFAULT_COUNTS.items():
        ap.add_argument(f"--{task}", type=int, default=n, help=f"{task} records (demo.base_tasks; 0 = none)")
    ap.add_argument("--seed", type=int, default=0, help="init seed (AE, model weights)")
    ap.add_argument("--eval-per-category", type=int, default=10, help="ShapesEval prompts per category (0 = skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared 2-core machine)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override, both stages")
    ap.add_argument("--reuse", default=None, help="a previous WORK dir whose ae/ and data/ this run links to")
    ap.add_argument("--eval-checkpoints", action="store_true", help="also evaluate every kept training checkpoint")
    ap.add_argument(
        "--timestep-init",
        default="standardized",
        choices=("official", "standardized"),
        help="time_embedder init (standardize_timestep_embedder)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, times = Path(args.work), {}
    work.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        for name in ("ae", "data"):
            if not (work / name).exists():
                (work / name).symlink_to(Path(args.reuse).resolve() / name)

    def stage(name: str, done: bool, fn) -> None:
        if done:
            print(f"[{name}] done before, skipped")
            return
        t0 = time.time()
        fn()
        times[name] = round(time.time() - t0)
        print(f"[{name}] {times[name]} s", flush=True)

    from demo.autoencoder import AETrainConfig, evaluate_autoencoder, save_autoencoder, train_autoencoder
    from demo.base_data import write_base_data

    vae = model_config(args.model_config).vae
    ae_cfg = AETrainConfig(
        canvas=vae.resolution,
        ch=vae.ch,
        ch_mult=list(vae.ch_mult),
        num_res_blocks=vae.num_res_blocks,
        z_channels=vae.z_channels,
        seed=args.seed,
        threads=args.threads,
    )
    if args.ae_steps is not None:
        ae_cfg.steps = args.ae_steps

    def do_ae() -> None:
        ae = train_autoencoder(ae_cfg)
        save_autoencoder(ae, work / "ae")
        metrics = {"config": dataclasses.asdict(ae_cfg), **evaluate_autoencoder(ae, ae_cfg.canvas)}
        (work / "ae" / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")

    stage("autoencoder", (work / "ae" / "metrics.json").is_file(), do_ae)

    def do_data() -> None:
        done = write_base_data(work / "data", {t: getattr(args, t) for t in DEFAULT_COUNTS}, vae.resolution)
        (work / "data" / "done.json").write_text(json.dumps(done) + "\n")

    stage("data", (work / "data" / "done.json").is_file(), do_data)
    cfg = model_config(args.model_config, work / "ae")
    stage(
        "tokenizer",
        (work / "tokenizer" / "tokenizer.json").is_file(),
        lambda: build_tokenizer(work / "data", cfg.llm.vocab_size).save_pretrained(work / "tokenizer"),
    )
    stage(
        "init",
        (work / "init" / "ema.safetensors").is_file(),
        lambda: build_init_checkpoint(
            cfg, work / "ae", work / "init", args.seed, args.timestep_init, work / "tokenizer"
        ),
    )
    stage(
        "pretrain",
        (work / "pretrain" / "export" / "ema.safetensors").is_file(),
        lambda: run_training(
            args.train_config, train_overrides(work, args.steps, args.train_config, "pretrain") + args.set
        ),
    )
    unified = train_overrides(work, args.unified_steps, args.unified_config, "run", "pretrain/export") + args.set
    stage(
        "unified",
        (work / "run" / "export" / "ema.safetensors").is_file(),
        lambda: run_training(args.unified_config, unified),
    )

    def do_export() -> None:
        model = Bagel.from_pretrained(work / "run" / "export")
        model.save_pretrained(args.out)
        load_tokenizer(work / "run" / "export").save_pretrained(args.out)
        ImageGeometry.from_dir(work / "run" / "export").save_dir(args.out)  # the sizes it was trained at
        save_checkpoint_options(
            args.out, {"flow": to_dict(FlowDefaults())}, "the shapes base's settings (demo.base_model.FlowDefaults)"
        )

    stage("export", False, do_export)
    result = {"stage_seconds": times}
    if args.eval_per_category > 0:
        t0 = time.time()
        result["shapes_eval"] = evaluate(args.out, args.eval_per_category, save_dir=work)
        times["evaluate"] = round(time.time() - t0)
    if args.eval_per_category > 0:
        from eval.skills import SkillsConfig, run

        t0 = time.time()
        skills = run(str(args.out), work / "skills", SkillsConfig(limit=args.eval_per_category))
        result["skills"] = {k: skills[k] for k in ("t2i", "edit", "edit_ops", "verdict", "caption")}
        times["skills"] = round(time.time() - t0)
    if args.eval_checkpoints:
        result["checkpoints"] = evaluate_checkpoints(work, args.unified_config, unified, max(args.eval_per_category, 5))
    (work / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
