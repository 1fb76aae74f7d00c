"""The method core (imports torch only): pruned layers, the sparsifier and its schedule, exact and
sharded quantiles, the fused update, the sparsity methods, FSDP2 support, MACs (one file per job;
docs/development.md, "Layout").
"""
