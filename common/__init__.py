"""Utilities below every other package (imports none of ours): the typed config mechanism (`common.config`).

Layering: `common` <- `bagel_ft` (the model) <- `training`, `inference` <- `data_gen`, `eval` <- the command line.
"""
