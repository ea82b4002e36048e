"""Stage 1 of FuseChat (pairwise knowledge fusion): data, teacher logits, alignment, training.

Filled in by the fusion issues; the merge stage lives in ``fusechat_merge``.
"""
