"""The stage plan on a Ray cluster: each stage a Ray task, every ready stage at once.

`RayExecutor` is an executor of `Runner.run`: it takes the stages the runner chose (what is
done is skipped there, as with the local executor) and submits each one as soon as every
stage it waits for (``Stage.after``) has finished, with the resources of its kind
(``resources:`` in the recipe, e.g. ``fuse: {num_gpus: 8}``). Inside the task the same
`Runner.run_stage` runs the same job and writes the same records, with ``executor: ray``
and the worker's host; a fuse stage with ``launch`` runs its accelerate launch on that node
(on the GPUs Ray gave the task: Ray sets ``CUDA_VISIBLE_DEVICES``). A stage that fails does
not stop the others: stages that do not depend on it finish, then the run fails naming it.

A stage that asks for GPUs runs in a fresh worker process (``max_calls=1``): GPU memory is
returned to the node when it ends, and its peak RSS is that stage's. CPU-only stages share
workers (no import of torch per stage); their peak RSS is the worker's peak so far, as with
the local executor. Tasks are not retried (``max_retries=0``): a rerun of the pipeline
resumes an interrupted stage from its records.

The work directory must be one filesystem seen by every node (NFS, Lustre, ...):
`check_shared_filesystem` has a task on each node read a probe file the driver wrote there.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline.plan import Stage
from fusechat_merge.pipeline.runner import RunError, Runner, StageError, Work, apply_record

PROBE_TIMEOUT_S = 120


class SharedFilesystemError(RuntimeError):
    pass


class RayExecutor:
    """Run a runner's stages as Ray tasks. ``address``: an existing cluster (``auto``,
    ``ray://host:10001``, ``host:6379``); None starts a local Ray instance for this run (or
    uses the one this process already started)."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus

    def __call__(self, runner: Runner, work: Work) -> None:
        if not work:
            return
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, log_to_driver=True)
            else:  # nothing large goes through the object store: keep it small
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, object_store_memory=128 * 2**20,
                         log_to_driver=True)
        try:
            check_shared_filesystem(runner.layout)
            self._schedule(runner, work)
        finally:
            if started_here:
                ray.shutdown()

    def _schedule(self, runner: Runner, work: Work) -> None:
        import ray

        gpu_task = ray.remote(max_calls=1, max_retries=0)(run_stage_task)
        cpu_task = ray.remote(max_retries=0)(run_stage_task)
        unfinished = {stage.id for stage, _, _ in work}
        waiting = list(work)  # plan order: a stage comes after everything it waits for
        running: dict[Any, Stage] = {}
        failed: list[StageError] = []
        not_run: set[str] = set()  # failed, or waiting for a failed stage
        blocked: list[str] = []
        while waiting or running:
            for item in list(waiting):
                stage, resume, reason = item
                if any(u in not_run for u in stage.after):
                    waiting.remove(item)
                    not_run.add(stage.id)
                    blocked.append(stage.id)
                    stage.status = "not run (upstream failed)"
                elif not any(u in unfinished for u in stage.after):
                    waiting.remove(item)
                    runner.log(f"[{stage.id}] submitted ({reason}) {_describe(stage.resources)}")
                    task = gpu_task if stage.resources.get("num_gpus") else cpu_task
                    ref = task.options(**ray_options(stage.resources), name=stage.id).remote(
                        str(runner.layout.root), stage, resume, reason)
                    running[ref] = stage
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                stage = running.pop(ref)
                unfinished.discard(stage.id)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died (OOM kill, lost node)
                    result = {"error": f"{type(err).__name__}: {err}"}
                if "record" in result:
                    apply_record(stage, result["record"])
                    runner.log(f"[{stage.id}] done on {result['record']['host']} "
                               f"in {stage.seconds:.1f}s")
                else:
                    not_run.add(stage.id)
                    stage.status = "failed"
                    failed.append(StageError(stage.id, result["error"]))
                    runner.log(f"[{stage.id}] FAILED: {result['error']}")
        if failed:
            raise RunError(failed, blocked)


def ray_options(resources: dict[str, Any]) -> dict[str, Any]:
    """A stage's resources as Ray task options."""
    options = {"num_cpus": resources.get("num_cpus", 1), "num_gpus": resources.get("num_gpus", 0)}
    if resources.get("memory"):
        options["memory"] = int(resources["memory"])
    return options


def _describe(resources: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in resources.items() if v)


def run_stage_task(root: str, stage: Stage, resume: bool, reason: str) -> dict[str, Any]:
    """The body of a stage's Ray task: `Runner.run_stage` in this worker, its log lines
    printed (Ray forwards them to the driver) and appended to ``WORK/logs/<stage>.log``.
    Returns ``{"record": done record}`` or ``{"error": message}``."""
    layout = WorkDir(Path(root))
    log_file = layout.log(stage.id)
    log_file.parent.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, flush=True)
        with log_file.open("a", encoding="utf-8") as f:
            f.write(message + "\n")

    runner = Runner([stage], layout, log=log, executor="ray")
    try:
        return {"record": runner.run_stage(stage, resume=resume, reason=reason)}
    except StageError as err:
        log(str(err))
        return {"error": err.error}


def check_shared_filesystem(layout: WorkDir) -> None:
    """Every alive node of the cluster reads a probe file written in the work dir, or
    `SharedFilesystemError` names the nodes that cannot."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    layout.records.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = layout.records / f".probe-{token}"
    probe.write_text(token, encoding="utf-8")
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(read_probe)
        refs = {}
        for node in ray.nodes():
            if node.get("Alive"):
                where = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                name = f"{node.get('NodeManagerHostname') or node['NodeManagerAddress']} ({node['NodeID'][:8]})"
                refs[name] = read.options(
                    scheduling_strategy=where).remote(str(probe))
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S), strict=True))
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted(host for host, (_, text) in seen.items() if text != token)
    if blind:
        raise SharedFilesystemError(
            f"the work dir {layout.root} is not shared with Ray node(s) {', '.join(blind)}: a worker "
            f"there cannot read {probe}. Put the work dir on a filesystem every node mounts at the same "
            "path (NFS, Lustre, GPFS, ...); see docs/cluster.md.")


def read_probe(path: str) -> tuple[str, str | None]:
    """(host, the probe's text or None) on the node this task runs on."""
    try:
        return socket.gethostname(), Path(path).read_text(encoding="utf-8")
    except OSError:
        return socket.gethostname(), None
