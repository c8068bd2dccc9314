"""Utilities below every other package (imports none of ours), one place each:

  config       the typed config mechanism: dataclasses -> YAML -> `key=value` overrides, validated once
  errors       UserError: what the command line reports in one line with exit status 2
  atomic       atomic writes of files and folders (`.tmp-*` sibling, then rename)
  images       PNG bytes <-> PIL images
  endpoint     the OpenAI-compatible chat client (+ `retries`, `concurrency`), used by data_gen, eval.wise and
               inference's `vlm` critic; `call_cache` its SQLite reply cache

Layering: `common` <- `bagel_ft` (the model) <- `training`, `inference` <- `data_gen`, `eval` <- `commands` (CLI).
"""
