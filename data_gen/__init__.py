"""data_gen: synthesis of PSIR training data (docs/format.md) — trajectories, critiques, alignment pairs.

Layout (one place each):
  config.py      typed config: defaults -> YAML -> --set overrides
  shards.py      --shard I/N, resumable chunked parquet output, SQLite manifest, merge
  summary.py     counters (kept / rejected / failed / invalid / retries / requests / tokens), progress
  budget.py      what a shard spent over its runs; the request and cost caps
  errors.py      how an item ends when it is not a record (Rejected, CallFailed, FatalError)
  backends/      extractor, editor, judge, sampler: shapes world, OpenAI-compatible, our models
  perturb.py     realistic mistakes (alignment negatives, the imperfect drafter)
  runner.py      the loop shared by the pipelines: a sliding window of prompts, clean stops (Ctrl-C, budgets)
  trajectories.py, critiques.py, alignment.py   the three pipelines
  (`bagel-ft data ...` is commands/data.py)

Built on `common`: the OpenAI-compatible client (`common/endpoint.py`: structured output, counted
retries (`retries.py`), adaptive concurrency (`concurrency.py`), single flight; also eval.wise's judge and
the vlm critic), the content-addressed call cache (`common/call_cache.py`, one SQLite file), atomic writes;
and on `inference.Generator` for our checkpoints (bagel editor, model sampler).
"""
