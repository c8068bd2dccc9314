"""demo: reproduction recipes for the embedded default (the shapes world), thin apps over the library.

  * `demo.autoencoder`  — train the tiny FLUX-style autoencoder on shapes renders; measure it with the judge.
  * `demo.base_data`    — shapes-world t2i + caption records (docs/format.md) for base pretraining.
  * `demo.base_model`   — the one command that rebuilds `checkpoints/shapes-base` end to end.
  * `commands.demo`, `demo.pipeline`, `demo.report` — `bagel-ft demo`: data, PSIR fine-tune of the base, PSIR on
                          held-out prompts, ShapesEval base vs fine-tuned, one HTML report; resumable phases.
  * `demo.reproduce`    — the miniature reproduction: single-pass vs PSIR vs PSIR + critiques fine-tunes at
                          equal steps and tokens, ShapesEval over seeds (docs/results.md "Miniature reproduction").

Each module's docstring gives its copy-paste command. Builds on `bagel_ft`, `scene_graphs`, `inference`,
`data_gen`, `eval` and the `bagel-ft train` entry point of `training` (never on their internals).
"""
