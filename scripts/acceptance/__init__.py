"""The GPU acceptance run (docs/gpu_acceptance.md): :mod:`.plan` what runs at which size, :mod:`.parts` the parts
and what they measure, :mod:`.driver` the loop and its records, :mod:`.report` records -> Markdown."""
