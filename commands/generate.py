"""Generate images and PSIR trajectories from prompts.

Each prompt gets a folder under --out with its images (NN.png), final.png, trajectory.json (format v1,
docs/format.md, image paths instead of bytes) and index.html (the trajectory as a strip of drafts; open it
in a browser). --out/results.jsonl has one line per prompt (folder, cost, stop reason; in the order they finish,
`index` is the prompt's position).

Modes: single (prompt -> one image), psir (the model plans, draws, inspects and refines on its own),
scaled (--streams P x --iterations I, --candidates k per step, a --verifier picks the best; rollback). The default
is the checkpoint's (`CKPT/inference.yaml` options.mode), else single: a model not fine-tuned on PSIR
trajectories draws nothing in psir mode (the command then says so and exits 2).

Sampling settings: inference's defaults, then the checkpoint's `inference.yaml` (its sampling defaults, e.g.
checkpoints/shapes-base: 26 points, shift 1, no CFG), then `--set options.KEY=VALUE`, then the flags below.

Examples:
  # tiny checkpoint on CPU (build one with `bagel-ft model --out runs/tiny-model`)
  bagel-ft generate --ckpt runs/tiny-model --prompt "a red circle left of a blue square" --out runs/gen --timesteps 10
  # the native loop with sampling, a prompt file (one prompt per line, or JSONL with a "prompt" field)
  bagel-ft generate --ckpt CKPT --prompts prompts.txt --out runs/psir --mode psir --temperature 0.7 --top-p 0.9
  # 7B on one GPU (bf16), plain text-to-image at 1024x1024 with the release's CFG settings
  bagel-ft generate --ckpt BAGEL-7B-MoT --prompt "a cozy cabin" --out runs/t2i --mode single --resolution 1024x1024
  # inference-time scaling judged by the shapes world, or by an OpenAI-compatible VLM critic
  bagel-ft generate --ckpt CKPT --prompt "two red circles" --out runs/scaled --mode scaled --streams 4 \\
      --iterations 3 --candidates 2 --verifier shapes
  bagel-ft generate --ckpt CKPT --prompt "..." --out runs/vlm --mode scaled --verifier vlm \\
      --critic-base-url http://127.0.0.1:8000/v1 --critic-model Qwen2.5-VL-7B --critic-api-key-env MY_KEY
  # many prompts: --batch-size samples at once (same images as one by one); 8 GPUs with torchrun
  torchrun --nproc_per_node 8 --no-python -- bagel-ft generate --ckpt CKPT --prompts prompts.txt --out runs/many
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from commands.options import add_set_argument, split_overrides, strip_section
from inference.settings import DECISIONS, DTYPE_NAMES, MODES, RENORM_TYPES, VERIFIERS

# flag -> (GenerateOptions key, help, choices, nargs): each flag sets one option; a flag not given leaves the
# checkpoint's inference.yaml (else inference's default) in place. Types come from the dataclass fields.
OPTION_FLAGS = {
    "text decoding and budgets": {
        "--max-turn-tokens": ("text.max_tokens", "tokens per text turn"),
        "--temperature": ("text.temperature", "0 = greedy"),
        "--top-p": ("text.top_p", "nucleus sampling mass (1 = off)"),
        "--max-steps": ("budget.max_steps", "text turns per stream"),
        "--max-images": ("budget.max_images", "images per stream"),
        "--max-tokens": ("budget.max_tokens", "text tokens per stream"),
        "--decision": (
            "decision",
            "draw/stop at <|im_end|>: two_way {vision_start, endoftext}; three_way adds "
            "<|im_start|> = another text turn",
            DECISIONS,
        ),
    },
    "image generation": {
        "--timesteps": ("flow.num_timesteps", "schedule points (steps + 1)"),
        "--shift": ("flow.timestep_shift", "timestep shift"),
        "--cfg-text-scale": ("flow.cfg_text_scale", "text CFG (1 = off)"),
        "--cfg-img-scale": ("flow.cfg_img_scale", "image CFG (1 = off)"),
        "--cfg-interval": ("flow.cfg_interval", "CFG applies where LO < t <= HI", None, 2),
        "--cfg-renorm-type": ("flow.cfg_renorm_type", "CFG renorm", RENORM_TYPES),
        "--cfg-renorm-min": ("flow.cfg_renorm_min", "lower clamp of the renorm"),
    },
    "scaled mode": {
        "--streams": ("scaling.streams", "P parallel streams"),
        "--iterations": ("scaling.iterations", "I steps per stream"),
        "--candidates": ("scaling.candidates", "k candidates per step"),
        "--verifier": ("verifier", "self (the model's inspect) | shapes | vlm", VERIFIERS),
        "--critic-base-url": ("critic.base_url", "vlm: OpenAI-compatible base URL"),
        "--critic-model": ("critic.model", "vlm: model name"),
        "--critic-api-key-env": ("critic.api_key_env", "vlm: NAME of the env var holding the key"),
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input / output")
    io.add_argument("--ckpt", required=True, help="checkpoint directory in the official layout")
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="file: one prompt per line, or JSONL with a 'prompt' field")
    io.add_argument("--out", required=True, help="output directory (one folder per prompt + results.jsonl)")
    io.add_argument(
        "--mode",
        default=None,
        choices=MODES,
        help="single | psir | scaled (default: the checkpoint's inference.yaml, else single)",
    )
    io.add_argument("--seed", type=int, default=0, help="seed of text sampling and flow noise (prompt i uses seed + i)")
    io.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts drawn at once in single/psir mode, each seeded by itself (same images as one at a "
        "time); default: 16 on CPU, by image size on a GPU",
    )
    io.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="draw every N-th prompt from the I-th (separate launches into one --out); under torchrun "
        "the ranks shard themselves",
    )
    io.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES), help="auto = bf16 on GPU, fp32 on CPU")
    io.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    io.add_argument(
        "--attn-backend",
        default="sdpa",
        choices=("sdpa", "flex", "flash"),
        help="LLM attention backend (flash needs flash-attn on a CUDA GPU)",
    )
    io.add_argument(
        "--tokenizer", default="auto", help="auto (checkpoint files / byte for the tiny vocab), byte, qwen2.5, DIR"
    )
    for name in ("vae-min-size", "vae-max-size", "vit-min-size", "vit-max-size"):
        io.add_argument(
            f"--{name}",
            type=int,
            default=None,
            help=f"image resize for context images, as training's data.{name.replace('-', '_')} "
            "(default: the checkpoint's image_geometry.json, else the official values)",
        )

    add_option_flags(parser, OPTION_FLAGS)
    g = parser.add_argument_group("options without a value")
    g.add_argument(
        "--fallback-image",
        action="store_true",
        help="psir/scaled: when a stream draws nothing, save a single-mode image as final.png (noted in meta)",
    )
    g.add_argument(
        "--resolution",
        default=None,
        help="HxW pixels (multiples of the latent stride); auto = the largest "
        "the model allows up to 1024x1024 (default: the checkpoint's, else auto)",
    )
    g.add_argument("--no-rollback", action="store_true", help="scaled: keep a worse step instead of rolling back")
    add_set_argument(parser, "options.flow.num_timesteps=11 (any GenerateOptions key under options.)")


def add_option_flags(parser: argparse.ArgumentParser, groups: dict) -> None:
    """One flag per OPTION_FLAGS entry, typed by its GenerateOptions field; default None = not given."""
    import typing

    from common.config import field_type
    from inference.settings import GenerateOptions

    for title, flags in groups.items():
        group = parser.add_argument_group(title)
        for flag, (key, help_text, *more) in flags.items():
            choices, nargs = (*more, None, None)[:2]
            tp = field_type(GenerateOptions, key)
            group.add_argument(flag, type=typing.get_args(tp)[0] if nargs else tp, default=None, choices=choices,
                               nargs=nargs, metavar=("LO", "HI") if nargs else None, help=help_text)  # fmt: skip


def options_from_args(args: argparse.Namespace, max_side: int):
    """GenerateOptions: inference's defaults < the checkpoint's inference.yaml < --set options.* < the flags given.
    The mode: --mode, else the checkpoint's, else single (a base model, not PSIR-trained, draws nothing in psir)."""
    from common.config import apply_overrides, set_path
    from inference.settings import checkpoint_options, resolve_options

    data = apply_overrides({}, strip_section(split_overrides(args.set, ("options",))["options"]))
    for group in OPTION_FLAGS.values():
        for flag, (key, *_) in group.items():
            value = getattr(args, flag[2:].replace("-", "_"))
            if value is not None:
                set_path(data, key.split("."), value)
    if args.fallback_image:
        data["fallback_image"] = True
    if args.no_rollback:
        set_path(data, ["scaling", "rollback"], False)
    mode = args.mode or checkpoint_options(args.ckpt).get("mode") or data.get("mode") or "single"
    options = resolve_options(args.ckpt, data, {"mode": mode, "seed": args.seed})
    if args.resolution is not None or not (options.flow.height and options.flow.width):
        options.flow.height, options.flow.width = parse_resolution(args.resolution or "auto", max_side)
    return options


def parse_resolution(text: str, max_side: int) -> tuple[int, int]:
    if text == "auto":
        side = min(1024, max_side)
        return side, side
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise SystemExit(f"--resolution: expected HxW (e.g. 512x768) or auto, got {text!r}") from e
    return h, w


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, or --prompts FILE (one per line, or JSONL with "prompt"); an empty prompt or file is refused."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise SystemExit('--prompt: expected a description of the picture, got ""')
        return [args.prompt]
    lines = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    prompts = [json.loads(line)["prompt"] if line.startswith("{") else line for line in lines]
    empty = [i + 1 for i, p in enumerate(prompts) if not str(p).strip()]
    if not prompts or empty:
        raise SystemExit(f"--prompts {args.prompts}: " + (f"empty prompt on lines {empty}" if empty else "no prompts"))
    return prompts


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inference.api import Generator  # torch and the model: imported only to run, not for --help
    from inference.sharding import current_shard

    try:
        shard = current_shard(args.shard)
    except ValueError as e:
        raise SystemExit(str(e)) from e

    geometry = {
        k: getattr(args, k)
        for k in ("vae_min_size", "vae_max_size", "vit_min_size", "vit_max_size")
        if getattr(args, k) is not None
    }
    prompts = read_prompts(args)  # bad input fails before the model loads
    generator = Generator.from_pretrained(
        args.ckpt,
        dtype=args.dtype,
        device=args.device,
        tokenizer=args.tokenizer,
        geometry=geometry,
        attn_backend=args.attn_backend,
    )
    options = options_from_args(args, generator.engine.max_image_side)
    generator.engine.latent_grid(options.flow.height, options.flow.width)  # fail early on a bad resolution
    mine = shard.select(list(enumerate(prompts)))  # (global index, prompt): prompt i keeps seed + i in any shard
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(prompt, args.seed + i) for i, prompt in mine]
    results = generator.generate_many(jobs, options=options, batch_size=args.batch_size)
    drawn = 0
    for k, result in tqdm(results, desc="generate", total=len(jobs), disable=len(jobs) < 2 or not shard.is_first):
        i, prompt = mine[k]
        drawn += result.image is not None
        folder = result.save(out, name=f"{i:04d}-{result.trajectory.id}")
        line = {
            "index": i,
            "prompt": prompt,
            "folder": folder.name,
            "cost": asdict(result.cost),
            "stop_reason": result.trajectory.meta.get("stop_reason"),
            "failure": result.trajectory.meta.get("failure"),
            "has_image": result.image is not None,
        }
        append_line(out / "results.jsonl", json.dumps(line))
        if len(prompts) == 1:
            print(f"{folder / 'index.html'}  ({line['stop_reason']}; cost {line['cost']})")
    if jobs and not drawn:  # e.g. psir on a model that was not PSIR-trained: it never opens an image
        raise SystemExit(
            f"no image drawn in {options.mode} mode for any of {len(jobs)} prompt(s) (stop reasons in "
            f"{out / 'results.jsonl'}); a checkpoint not trained on PSIR trajectories draws in "
            "--mode single, or add --fallback-image"
        )
    return 0


def append_line(path: Path, line: str) -> None:
    """Append one line with one O_APPEND write: ranks appending to the same file never interleave lines."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
