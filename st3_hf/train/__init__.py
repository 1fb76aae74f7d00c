"""Training runs: recipes, the trainer, checkpoints, guards, data, evaluation and run exports.

Above the core (:mod:`st3_hf.sparse`) and the hub (:mod:`st3_hf.hub`); ``scripts/`` call into it.
"""
