"""What any stage needs while it runs: progress and log capture, stopping at a safe point,
memory faults worded, models with remote code."""
