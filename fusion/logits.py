"""Moved to ``fusion.capture.logit_job``; this re-export stays for one release."""

from fusion.capture.logit_job import (  # noqa: F401
    LogitJob,
    generate_logits,
    less_memory,
    load_model_parts,
    score_shard,
    shard_rows,
)
