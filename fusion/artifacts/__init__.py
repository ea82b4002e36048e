"""The artifacts on disk: their formats, readers and writers, and what made each one.

Every output is written atomically and carries a record of what made it, so a stage can be
resumed, reused or refused.
"""
