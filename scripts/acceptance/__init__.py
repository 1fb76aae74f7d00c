"""GPU acceptance run: one prepared driver that measures every GPU claim of the project inside a short lease.

The driver (:func:`~acceptance.driver.run_acceptance`, CLI ``scripts/gpu_acceptance.py``) runs
parts in order of value, each with its own time budget, and appends one JSON line per part to
``OUT/acceptance.jsonl`` the moment the part ends, so a run cut off by the machine's limit keeps
every earlier result. ``--device cpu`` runs the same parts at tiny sizes (the test suite's dry run).

Modules: :mod:`.records` (the JSON lines, subprocesses with deadlines), :mod:`.imagenet_layout`
(generated ImageNet-layout JPEGs), :mod:`.measure` (throughput from a run's metrics, loader-only
speed, host profile), :mod:`.plan` (what each part runs, at GPU and CPU sizes), :mod:`.driver`
(the parts themselves), :mod:`.report` (run records -> Markdown for BENCHMARKS.md / RESULTS.md).
"""
