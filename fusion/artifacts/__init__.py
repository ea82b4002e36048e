"""The artifacts on disk: their formats, readers and writers, and what made each one.

Every output goes through one lifecycle (`fusion.artifacts.lifecycle`, docs/outputs.md):
overlap with its inputs refused, locked (`locks`), a killed writer's leftovers cleaned, its
run record (`records`) compared under one resume policy, write faults named
(`write_faults`), pieces kept or the whole published atomically (`atomic`).
"""
