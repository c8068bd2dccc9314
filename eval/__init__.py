"""eval: GenEval, WISE and ShapesEval the way their papers ran them, over any generator, resumable.

  generator.py    the `(prompt, seed) -> Generation` interface, `load_generator(--ckpt, --mode)`
  run_dir.py      the on-disk run (config.json, records.jsonl, summary.json), atomic writes
  geneval.py      official layout + official scorer + summary_scores.py's summary
  wise.py         WISE prompts, the WISE judge protocol over an OpenAI-compatible VLM, WiScore
  shapes_eval.py  the shapes world's exact benchmark, scored by the pixel-level judge
  report.py       markdown + HTML comparison of runs
  (`bagel-ft eval` and `bagel-ft report`: commands/eval.py, commands/report.py)

Layering: builds on `inference` (drawing) and `scene_graphs.shapes` (the judge); never on `training`.
"""
