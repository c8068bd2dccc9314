"""Generate images and PSIR trajectories from prompts.

Each prompt gets a folder under --out with its images (NN.png), final.png, trajectory.json (format v1,
docs/format.md, image paths instead of bytes) and index.html (the trajectory as a strip of drafts; open it
in a browser). --out/results.jsonl has one line per prompt (folder, cost, stop reason; in the order they finish,
`index` is the prompt's position).

Modes: single (prompt -> one image), psir (the model plans, draws, inspects and refines on its own),
scaled (--streams P x --iterations I, --candidates k per step, a --verifier picks the best; rollback).

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

from inference.settings import (
    DECISIONS,
    DTYPE_NAMES,
    MODES,
    RENORM_TYPES,
    VERIFIERS,
    Budget,
    CriticEndpoint,
    FlowSettings,
    GenerateOptions,
    ScalingSettings,
    TextSettings,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input / output")
    io.add_argument("--ckpt", required=True, help="checkpoint directory in the official layout")
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="file: one prompt per line, or JSONL with a 'prompt' field")
    io.add_argument("--out", required=True, help="output directory (one folder per prompt + results.jsonl)")
    io.add_argument("--mode", default="psir", choices=MODES, help="single | psir | scaled (default psir)")
    io.add_argument("--seed", type=int, default=0, help="seed of text sampling and flow noise (prompt i uses seed + i)")
    io.add_argument("--batch-size", type=int, default=None,
                    help="prompts drawn at once in single/psir mode, each seeded by itself (same images as one at a "
                         "time); default: 16 on CPU, by image size on a GPU")
    io.add_argument("--shard", default=None, metavar="I/N",
                    help="draw every N-th prompt from the I-th (separate launches into one --out); under torchrun "
                         "the ranks shard themselves")
    io.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES), help="auto = bf16 on GPU, fp32 on CPU")
    io.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    io.add_argument("--attn-backend", default="sdpa", choices=("sdpa", "flex", "flash"),
                    help="LLM attention backend (flash needs flash-attn on a CUDA GPU)")
    io.add_argument("--tokenizer", default="auto", help="auto (checkpoint files / byte for the tiny vocab), byte, qwen2.5, DIR")
    for name in ("vae-min-size", "vae-max-size", "vit-min-size", "vit-max-size"):
        io.add_argument(f"--{name}", type=int, default=None,
                        help=f"image resize for context images, as training's data.{name.replace('-', '_')} "
                             "(default: the checkpoint's image_geometry.json, else the official values)")

    t = parser.add_argument_group("text decoding and budgets")
    t.add_argument("--max-turn-tokens", type=int, default=TextSettings.max_tokens, help="tokens per text turn")
    t.add_argument("--temperature", type=float, default=TextSettings.temperature, help="0 = greedy")
    t.add_argument("--top-p", type=float, default=TextSettings.top_p, help="nucleus sampling mass (1 = off)")
    t.add_argument("--max-steps", type=int, default=Budget.max_steps, help="text turns per stream")
    t.add_argument("--max-images", type=int, default=Budget.max_images, help="images per stream")
    t.add_argument("--max-tokens", type=int, default=Budget.max_tokens, help="text tokens per stream")
    t.add_argument("--decision", default="three_way", choices=DECISIONS,
                   help="draw/stop at <|im_end|>: two_way {vision_start, endoftext}; three_way adds <|im_start|> = another text turn")
    t.add_argument("--fallback-image", action="store_true",
                   help="psir/scaled: when a stream draws nothing, save a single-mode image as final.png (noted in meta)")

    f = parser.add_argument_group("image generation")
    f.add_argument("--resolution", default="auto", help="HxW pixels (multiples of the latent stride); auto = the largest "
                                                        "the model allows up to 1024x1024")
    f.add_argument("--timesteps", type=int, default=FlowSettings.num_timesteps, help="schedule points (steps + 1)")
    f.add_argument("--shift", type=float, default=FlowSettings.timestep_shift, help="timestep shift")
    f.add_argument("--cfg-text-scale", type=float, default=FlowSettings.cfg_text_scale, help="text CFG (1 = off)")
    f.add_argument("--cfg-img-scale", type=float, default=FlowSettings.cfg_img_scale, help="image CFG (1 = off)")
    f.add_argument("--cfg-interval", type=float, nargs=2, default=list(FlowSettings.cfg_interval), metavar=("LO", "HI"),
                   help="CFG applies where LO < t <= HI")
    f.add_argument("--cfg-renorm-type", default=FlowSettings.cfg_renorm_type, choices=RENORM_TYPES, help="CFG renorm")
    f.add_argument("--cfg-renorm-min", type=float, default=FlowSettings.cfg_renorm_min, help="lower clamp of the renorm")

    s = parser.add_argument_group("scaled mode")
    s.add_argument("--streams", type=int, default=ScalingSettings.streams, help="P parallel streams")
    s.add_argument("--iterations", type=int, default=ScalingSettings.iterations, help="I steps per stream")
    s.add_argument("--candidates", type=int, default=ScalingSettings.candidates, help="k candidates per step")
    s.add_argument("--no-rollback", action="store_true", help="keep a worse step instead of rolling back")
    s.add_argument("--verifier", default="self", choices=VERIFIERS, help="self (the model's inspect) | shapes | vlm")
    s.add_argument("--critic-base-url", default="", help="vlm: OpenAI-compatible base URL")
    s.add_argument("--critic-model", default="", help="vlm: model name")
    s.add_argument("--critic-api-key-env", default="OPENAI_API_KEY", help="vlm: NAME of the env var holding the key")


def options_from_args(args: argparse.Namespace, max_side: int) -> GenerateOptions:
    height, width = parse_resolution(args.resolution, max_side)
    return GenerateOptions(
        mode=args.mode,
        seed=args.seed,
        text=TextSettings(max_tokens=args.max_turn_tokens, temperature=args.temperature, top_p=args.top_p),
        flow=FlowSettings(height=height, width=width, num_timesteps=args.timesteps, timestep_shift=args.shift,
                          cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale,
                          cfg_interval=tuple(args.cfg_interval), cfg_renorm_type=args.cfg_renorm_type,
                          cfg_renorm_min=args.cfg_renorm_min),
        budget=Budget(max_steps=args.max_steps, max_images=args.max_images, max_tokens=args.max_tokens),
        decision=args.decision,
        fallback_image=args.fallback_image,
        scaling=ScalingSettings(streams=args.streams, iterations=args.iterations, candidates=args.candidates,
                                rollback=not args.no_rollback),
        verifier=args.verifier,
        critic=CriticEndpoint(base_url=args.critic_base_url, model=args.critic_model,
                              api_key_env=args.critic_api_key_env),
    )


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
    if args.prompt is not None:
        return [args.prompt]
    lines = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    return [json.loads(line)["prompt"] if line.startswith("{") else line for line in lines]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inference.api import Generator  # torch and the model: imported only to run, not for --help
    from inference.sharding import current_shard

    try:
        shard = current_shard(args.shard)
    except ValueError as e:
        raise SystemExit(str(e)) from e

    geometry = {k: getattr(args, k) for k in ("vae_min_size", "vae_max_size", "vit_min_size", "vit_max_size")
                if getattr(args, k) is not None}
    generator = Generator.from_pretrained(args.ckpt, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
                                          geometry=geometry, attn_backend=args.attn_backend)
    options = options_from_args(args, generator.engine.max_image_side)
    generator.engine.latent_grid(options.flow.height, options.flow.width)  # fail early on a bad resolution
    prompts = read_prompts(args)
    mine = shard.select(list(enumerate(prompts)))  # (global index, prompt): prompt i keeps seed + i in any shard
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(prompt, args.seed + i) for i, prompt in mine]
    results = generator.generate_many(jobs, options=options, batch_size=args.batch_size)
    for k, result in tqdm(results, desc="generate", total=len(jobs), disable=len(jobs) < 2 or not shard.is_first):
        i, prompt = mine[k]
        folder = result.save(out, name=f"{i:04d}-{result.trajectory.id}")
        line = {"index": i, "prompt": prompt, "folder": folder.name, "cost": asdict(result.cost),
                "stop_reason": result.trajectory.meta.get("stop_reason"),
                "failure": result.trajectory.meta.get("failure"), "has_image": result.image is not None}
        append_line(out / "results.jsonl", json.dumps(line))
        if len(prompts) == 1:
            print(f"{folder / 'index.html'}  ({line['stop_reason']}; cost {line['cost']})")
    return 0


def append_line(path: Path, line: str) -> None:
    """Append one line with one O_APPEND write: ranks appending to the same file never interleave lines."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
