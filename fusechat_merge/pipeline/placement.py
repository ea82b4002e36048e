"""Where a stage ran, for its done record: what it asked of the scheduler and what it got.

``placement`` holds the stage's ``resources`` (what the plan asked for), and, when the stage
ran as a Ray task, the Ray node and the GPU ids Ray gave the task; ``CUDA_VISIBLE_DEVICES``
when set. From these records a run's placement can be checked after the fact: each scoring
part held its tensor-parallel GPUs, each fuse stage a whole node, no GPU served two stages
at once (tests/test_rehearsal.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any


def placement(resources: dict[str, Any]) -> dict[str, Any]:
    """The ``placement`` field of a done record (never imports Ray: a Ray task has it loaded)."""
    where: dict[str, Any] = {"asked": dict(resources)}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        context = ray.get_runtime_context()
        if context.worker.mode == ray.WORKER_MODE:  # in a task, not in the driver
            where["node_id"] = context.get_node_id()
            where["gpu_ids"] = sorted(str(g) for g in context.get_accelerator_ids().get("GPU", []))
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        where["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return where
