"""The method core (imports torch only): pruned layers, the sparsifier and its schedule, exact and
sharded quantiles, the fused update, Feather / ProbMask rules, FSDP2 support, MACs.

One file per job: ``layers.py`` (the ``weight`` property and each method's gradient), ``sparsifier.py``
(schedule, global threshold, masks, optimizer hook, state), ``schedule.py`` (the cubic ramp),
``threshold.py`` / ``distributed_quantile.py`` (exact quantiles), ``fused_update.py``, ``feather.py``,
``probmask.py``, ``fsdp.py``, ``macs.py``, ``config.py`` (:class:`SparsityConfig`).
"""
