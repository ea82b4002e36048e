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
the local executor.

A stage lost with its worker or node (the OOM killer, a preempted node, a spot instance
reclaimed: `LOST`), or stopped by a SIGTERM sent to its worker, is submitted again, up to
``retries`` times (the recipe's ``retries``, ``run --retries``): the new attempt resumes
from what the lost one completed (its shards, its last checkpoint), as a rerun would. A
stage that fails by its own error (a bad input) is not retried. Each attempt (host, pid,
when, why it was lost) is in the stage's records (``attempts``) and ``status``. Ray's own
task retries stay off (``max_retries=0``): they would rerun a stage without telling it to
resume, and without a record of the attempt.

The work directory must be one filesystem seen by every node (NFS, Lustre, ...):
`check_shared_filesystem` has a task on each node read a probe file the driver wrote there.
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Any

from fusechat_merge.console import reason_note
from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline.plan import Stage
from fusechat_merge.pipeline.runner import RunError, Runner, StageError, Work, apply_record
from fusechat_merge.pipeline.stage_records import current, read_stage_records
from fusion.errors import FusionError
from fusion.runtime.stopping import Stopped, check, on_signals, reclaim, requested, watching

PROBE_TIMEOUT_S = 120
STOP_WAIT_S = 600  # how long a stopped driver waits for its tasks' safe points
LOST = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "OutOfMemoryError", "ObjectLostError",
        "OwnerDiedError")
"""Ray's errors that mean the stage's worker or node was lost (not the stage's own error)."""


class SharedFilesystemError(FusionError, RuntimeError):
    """The Ray workers do not see the work dir the driver writes (no shared filesystem)."""


class RayExecutor:
    """Run a runner's stages as Ray tasks. ``address``: an existing cluster (``auto``,
    ``ray://host:10001``, ``host:6379``); None starts a local Ray instance for this run (or
    uses the one this process already started)."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, retries: int = 2) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.retries = retries

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
            reclaim()  # ray.init made SIGTERM a bare sys.exit: ours names the stages it stops
        try:  # a signal raised inside Ray's calls would break them: the loop checks for it instead
            with watching():
                check_shared_filesystem(runner.layout)
                self._schedule(runner, work)
        finally:
            if started_here:
                ray.shutdown()

    def _schedule(self, runner: Runner, work: Work) -> None:
        import ray

        gpu_task = ray.remote(max_calls=1, max_retries=0)(run_stage_task)
        cpu_task = ray.remote(max_retries=0)(run_stage_task)

        def submit(stage: Stage, resume: bool, reason: str, attempts: list[dict[str, Any]]) -> None:
            task = gpu_task if stage.resources.get("num_gpus") else cpu_task
            ref = task.options(**ray_options(stage.resources), name=stage.id).remote(
                str(runner.layout.root), stage, resume, reason, attempts)
            running[ref] = (stage, reason, attempts)

        unfinished = {stage.id for stage, _, _ in work}
        waiting = list(work)  # plan order: a stage comes after everything it waits for
        running: dict[Any, tuple[Stage, str, list[dict[str, Any]]]] = {}
        failed: list[StageError] = []
        not_run: set[str] = set()  # failed, or waiting for a failed stage
        blocked: list[str] = []
        try:
            while waiting or running:
                if requested():  # asked to stop (SIGTERM, Ctrl-C): so are the tasks, at their safe points
                    check(lambda: _stop_tasks(list(running)))
                for item in list(waiting):
                    stage, resume, reason = item
                    if any(u in not_run for u in stage.after):
                        waiting.remove(item)
                        not_run.add(stage.id)
                        blocked.append(stage.id)
                        stage.status = "not run (upstream failed)"
                    elif not any(u in unfinished for u in stage.after):
                        waiting.remove(item)
                        runner.log(f"[{stage.id}] submitted{reason_note(reason)} {_describe(stage.resources)}")
                        submit(stage, resume, reason, [])
                if not running:
                    break
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    stage, reason, attempts = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        result = {"lost" if type(err).__name__ in LOST else "error": _first_line(err)}
                    if "lost" in result and len(attempts) < self.retries:
                        attempts = [*attempts, lost_attempt(runner.layout, stage, result["lost"])]
                        resume = runner.state(stage) == "resume"  # it got as far as its started record
                        runner.log(f"[{stage.id}] attempt {len(attempts)} lost on {attempts[-1]['host']}: "
                                   f"{result['lost']}; attempt {len(attempts) + 1} of {self.retries + 1}"
                                   f"{', resuming' if resume else ''}")
                        submit(stage, resume, reason, attempts)
                        continue
                    unfinished.discard(stage.id)
                    if "record" in result:
                        apply_record(stage, result["record"])
                        runner.log(f"[{stage.id}] done on {result['record']['host']} "
                                   f"in {stage.seconds:.1f}s")
                        continue
                    error = result.get("error") or (f"lost {len(attempts) + 1} times (retries: {self.retries}); "
                                                    f"the last time: {result['lost']}")
                    not_run.add(stage.id)
                    stage.status = "failed"
                    failed.append(StageError(stage.id, error))
                    runner.log(f"[{stage.id}] FAILED: {error}")
        except Stopped as stop:
            stop.stage = ", ".join(stage.id for stage, _, _ in running.values()) or None
            raise
        if failed:
            raise RunError(failed, blocked)


def _stop_tasks(refs: list[Any]) -> str:
    """Ask the running tasks to stop (Ray's cancel interrupts a task as Ctrl-C does: each
    stage stops at its next safe point, a training saves a checkpoint) and wait for them
    (a second Ctrl-C: at once)."""
    import ray

    for ref in refs:
        ray.cancel(ref)
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STOP_WAIT_S) if refs else ([], [])
    left = len(refs) - len(ready)
    return ("the running stages stopped at their safe points" if not left else
            f"{left} running stage(s) did not stop within {STOP_WAIT_S}s and were ended") + "; a rerun resumes them"


def lost_attempt(layout: WorkDir, stage: Stage, why: str) -> dict[str, Any]:
    """What the records say of an attempt that was lost: where it ran (from its started
    record, if it got that far), when, and why it was lost."""
    started = read_stage_records(layout.records, stage.id).started
    if not current(started, stage.key):
        started = {}
    return {"host": started.get("host", "?"), "pid": started.get("pid"), "started_at": started.get("started_at"),
            "ended_at": time.time(), "lost": why}


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def ray_options(resources: dict[str, Any]) -> dict[str, Any]:
    """A stage's resources as Ray task options."""
    options = {"num_cpus": resources.get("num_cpus", 1), "num_gpus": resources.get("num_gpus", 0)}
    if resources.get("memory"):
        options["memory"] = int(resources["memory"])
    return options


def _describe(resources: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in resources.items() if v)


def run_stage_task(root: str, stage: Stage, resume: bool, reason: str,
                   attempts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The body of a stage's Ray task: `Runner.run_stage` in this worker, its log lines
    printed (Ray forwards them to the driver) and appended to ``WORK/logs/<stage>.log``.
    ``attempts``: the earlier attempts, lost. Returns ``{"record": done record}``,
    ``{"error": message}`` or ``{"lost": why}`` (a SIGTERM to this worker: the stage stopped
    at a safe point, another attempt resumes it)."""
    layout = WorkDir(Path(root))
    log_file = layout.log(stage.id)
    log_file.parent.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, flush=True)
        with log_file.open("a", encoding="utf-8") as f:
            f.write(message + "\n")

    runner = Runner([stage], layout, log=log, executor="ray")
    try:
        with on_signals(notify=log):
            return {"record": runner.run_stage(stage, resume=resume, reason=reason, attempts=attempts or [])}
    except StageError as err:
        log(str(err))
        return {"error": err.error}
    except Stopped as stop:
        log(f"[{stage.id}] {stop}")
        return {"lost": str(stop)}


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
