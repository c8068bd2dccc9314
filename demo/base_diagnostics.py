"""Does a base model use the timestep and the prompt? Velocity error by t on real shapes renders.

    python -m demo.base_diagnostics checkpoints/shapes-base            # 40 ShapesEval renders, ~30 s on a CPU
    python -m demo.base_diagnostics checkpoints/shapes-base --words    # + which words it reads

For ShapesEval prompts rendered at the model's canvas, with fixed noise eps and x_t = (1 - t) x0 + t eps, the mean
squared error of the predicted velocity against eps - x0 (the training target) is measured three ways:

  true t      the model is told the true t, with the prompt (the training condition)
  told 0.5    the model is told t = 0.5 instead: if this is no worse, the model ignores the timestep
  no prompt   the true t, with an empty context (text CFG's unconditional branch)

and the conditioning gain (no prompt - true t) / no prompt: how much the prompt lowers the error. With latents
normalised to unit variance, an error above 1 at t = 1 is worse than predicting the unconditional mean image.

`--words`: which words the model reads. Single objects "a COLOR SHAPE" (every shape x 4 colors) rendered, and
the same velocity error with the prompt's shape word or color word swapped for another: the error's rise
over the true prompt's is how much the model's drawing depends on that word (0% = the word is ignored).
docs/results.md ("Shapes base model") reads these tables for the trials.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

TIMESTEPS = (1.0, 0.95, 0.9, 0.7, 0.5, 0.3)


@dataclass
class Row:
    t: float
    true_t: float
    told_half: float
    no_prompt: float

    @property
    def conditioning_gain(self) -> float:
        return (self.no_prompt - self.true_t) / self.no_prompt


def clean_latent(engine, graph, seed: int) -> tuple[torch.Tensor, int, int]:
    """(patchified clean latent x0 on the CPU, latent h, latent w) of `render(graph, canvas, seed)`."""
    from bagel_ft.embeddings import patchify_latent
    from scene_graphs.shapes import render

    f, p = engine.config.latent_downsample, engine.config.arch.latent_patch_size
    x = engine.prepare_image(render(graph, engine.max_image_side, seed=seed)[0], "vae")
    x0 = patchify_latent(engine.model.encode_images(x[None].to(engine.device))[0], p).float().cpu()
    return x0, x.shape[1] // f, x.shape[2] // f


def velocity_mse(engine, ctx, x_t: torch.Tensor, t: float, h: int, w: int, target: torch.Tensor) -> float:
    """Mean squared error of the velocity the model predicts in context `ctx`, told timestep `t`."""
    return (engine.velocity(ctx, x_t, t, h, w).cpu() - target).pow(2).mean().item()


@torch.no_grad()
def velocity_errors(ckpt: str, prompts: int = 40, seed: int = 0, timesteps=TIMESTEPS) -> list[Row]:
    """The module doc's table for the first `prompts` of every tenth ShapesEval prompt."""
    from inference.engine import Engine
    from inference.psir import start_stream
    from scene_graphs.shapes import shapes_eval_prompts

    engine = Engine.from_pretrained(ckpt)
    chosen = shapes_eval_prompts()[::10][:prompts]
    gen = torch.Generator().manual_seed(seed)
    sums = {t: [0.0, 0.0, 0.0] for t in timesteps}
    for i, prompt in enumerate(chosen):
        x0, h, w = clean_latent(engine, prompt.graph, seed=i)
        stream = start_stream(engine, prompt.text)
        eps = torch.randn(x0.shape, generator=gen)
        for t in timesteps:
            x_t, target = (1 - t) * x0 + t * eps, eps - x0
            for k, (ctx, told) in enumerate(((stream.gen, t), (stream.gen, 0.5), (stream.cfg_text, t))):
                sums[t][k] += velocity_mse(engine, ctx, x_t, told, h, w, target)
    return [Row(t, *(v / len(chosen) for v in sums[t])) for t in timesteps]


@torch.no_grad()
def word_sensitivity(ckpt: str, seed: int = 0, timesteps=(0.9, 0.7, 0.5)) -> dict[float, dict[str, float]]:
    """{t: {"true": mse, "shape swapped": mse, "color swapped": mse, "no prompt": mse}} (module doc, `--words`)."""
    from inference.engine import Engine
    from inference.psir import start_stream
    from scene_graphs.shapes import SHAPES, parse_prompt

    engine = Engine.from_pretrained(ckpt)
    gen = torch.Generator().manual_seed(seed)
    colors = ("red", "blue", "yellow", "green")
    sums = {t: dict.fromkeys(("true", "shape swapped", "color swapped", "no prompt"), 0.0) for t in timesteps}
    n = 0
    for i, shape in enumerate(SHAPES):
        for j, color in enumerate(colors):
            text = f"a {color} {shape}"
            variants = {
                "true": text,
                "shape swapped": f"a {color} {SHAPES[(i + 1 + j) % len(SHAPES)]}",
                "color swapped": f"a {colors[(j + 1) % len(colors)]} {shape}",
            }
            x0, h, w = clean_latent(engine, parse_prompt(text), seed=n)
            streams = {k: start_stream(engine, v) for k, v in variants.items()}
            eps = torch.randn(x0.shape, generator=gen)
            for t in timesteps:
                x_t, target = (1 - t) * x0 + t * eps, eps - x0
                for k, stream in streams.items():
                    sums[t][k] += velocity_mse(engine, stream.gen, x_t, t, h, w, target)
                sums[t]["no prompt"] += velocity_mse(engine, streams["true"].cfg_text, x_t, t, h, w, target)
            n += 1
    return {t: {k: v / n for k, v in row.items()} for t, row in sums.items()}


def format_words(table: dict[float, dict[str, float]]) -> str:
    lines = [
        "| t | MSE, true prompt | shape word swapped | color word swapped | no prompt |",
        "|---|---|---|---|---|",
    ]
    for t, r in table.items():
        rise = {k: (r[k] - r["true"]) / r["true"] for k in ("shape swapped", "color swapped", "no prompt")}
        lines.append(
            f"| {t} | {r['true']:.3f} | {r['shape swapped']:.3f} ({rise['shape swapped']:+.1%}) | "
            f"{r['color swapped']:.3f} ({rise['color swapped']:+.1%}) | {r['no prompt']:.3f} ({rise['no prompt']:+.1%}) |"
        )
    return "\n".join(lines)


def format_rows(rows: list[Row]) -> str:
    lines = ["| t | MSE, true t | MSE, told t = 0.5 | MSE, no prompt | conditioning gain |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.t} | {r.true_t:.3f} | {r.told_half:.3f} | {r.no_prompt:.3f} | {r.conditioning_gain:+.1%} |" for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="checkpoint dir (official layout with ae.safetensors)")
    ap.add_argument("--prompts", type=int, default=40, help="ShapesEval prompts (every tenth)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--words", action="store_true", help="also the shape / color word sensitivity table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(format_rows(velocity_errors(args.ckpt, args.prompts)))
    if args.words:
        print()
        print(format_words(word_sensitivity(args.ckpt)))


if __name__ == "__main__":
    main()
