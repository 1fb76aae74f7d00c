"""The method core (imports torch only): pruned layers, the sparsifier and its schedule, exact and
sharded quantiles, the fused update, the sparsity methods, FSDP2 support, MACs.

One file per job: ``layers.py`` (the ``weight`` property and the layer modes), ``sparsifier.py``
(schedule, masks, optimizer hook, state), ``methods/`` (one file per method behind one interface,
``methods/base.py``, and the registry), ``schedule.py`` (the cubic ramp), ``threshold.py`` /
``distributed_quantile.py`` (exact quantiles), ``fused_update.py``, ``fsdp.py``, ``macs.py``,
``config.py`` (:class:`SparsityConfig`).
"""
