"""The GPU acceptance run (docs/gpu_acceptance.md): :mod:`.plan` what runs at which size, :mod:`.parts` the parts
and what they measure, :mod:`.report` records -> Markdown; ``scripts/gpu_acceptance.py`` runs the parts."""
