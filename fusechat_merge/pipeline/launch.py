"""A fuse stage under ``accelerate launch``: the command, its log, its failure.

`run_launched` writes the stage's training options to ``WORK/logs/<stage>.fuse.yaml`` and
runs ``accelerate launch --config_file C [--num_processes N] -m fusechat_merge.cli fuse
--pivot P --aligned A --out OUT --config that.yaml --log LOG [--resume]`` in a subprocess
(the same Python, so the same environment), its output in ``WORK/logs/<stage>.log`` (LOG),
its training's bar followed here from the progress its main process reports. The target,
its checkpoints and ``--resume`` are those of the in-process stage: the same options reach
the same `fusion.train.trainer.train_fusion`, only in N processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from fusechat_merge.recipe_keys import RecipeFileError, read_recipe_file
from fusion.artifacts.atomic import write_text_atomic
from fusion.errors import FusionError
from fusion.runtime import stopping
from fusion.runtime.progress import Follower

TAIL_LINES = 40


class Launchable(Protocol):
    """What a launch needs of a fuse job (`fusechat_merge.pipeline.jobs.FuseJob` is one):
    its inputs and output, the ``fuse.launch`` values, where its log and options go."""

    @property
    def pivot(self) -> str: ...
    @property
    def aligned(self) -> Sequence[str]: ...
    @property
    def out(self) -> str: ...
    @property
    def launch(self) -> Mapping[str, Any] | None: ...
    @property
    def log_file(self) -> str: ...
    @property
    def config_file(self) -> str: ...
    def training_options(self) -> dict[str, Any]: ...


class LaunchError(FusionError, RuntimeError):
    """A launched stage exited with an error: its exit code and the last lines of its log."""

    def __init__(self, command: str, returncode: int, log_file: str, tail: str) -> None:
        self.returncode = returncode
        self.log_file = log_file
        self.tail = tail
        super().__init__(f"{command} exited with code {returncode}; the last lines of {log_file}:\n{tail}")


def launch_command(job: Launchable, resume: bool) -> list[str]:
    """The ``accelerate launch`` command line of a fuse job (``job.launch`` set)."""
    assert job.launch is not None
    spec = job.launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", spec["accelerate_config"]]
    if spec.get("num_processes"):
        cmd += ["--num_processes", str(spec["num_processes"])]
    cmd += ["--main_process_port", str(spec.get("main_process_port", 0)), *spec.get("args", [])]
    cmd += ["-m", "fusechat_merge.cli", "fuse", "--pivot", job.pivot]
    for store in job.aligned:
        cmd += ["--aligned", store]
    cmd += ["--out", job.out, "--config", job.config_file, "--log", job.log_file]
    return [*cmd, "--resume"] if resume else cmd


def run_launched(job: Launchable, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the job under accelerate launch; returns ``{"peak_rss_mb": ...}``, the peak RSS of
    the largest process of the launch (from ``wait4``: that child and its descendants only)."""
    write_text_atomic(job.config_file, yaml.safe_dump(job.training_options(), sort_keys=True))
    cmd = launch_command(job, resume)
    log_file = Path(job.log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    as_ddp = "; FSDP with use_cpu: accelerate runs it as DDP (it allows FSDP on accelerators only)" \
        if fsdp_on_cpu(job) else ""
    log(f"accelerate launch ({job.launch and job.launch.get('num_processes') or 'config'} processes), "
        f"log: {log_file}{as_ddp}")
    with log_file.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        follower = Follower()  # the training's bar, from the progress its main process reports
        forwarded = False
        try:
            with stopping.watching():  # a stop request goes to the training, which saves a checkpoint
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if stopping.requested() and not forwarded:
                        proc.send_signal(signal.SIGTERM)
                        forwarded = True
                    follower.poll()
                    time.sleep(0.2 if forwarded else 1.0)
        except BaseException:  # interrupted: do not leave training processes behind
            proc.terminate()
            proc.wait()
            raise
        finally:
            follower.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    signum = stopping.requested()
    if signum is not None and proc.returncode != 0:
        raise stopping.Stopped(signum, f"the launched training stopped: {_last_checkpoint(job.out)}; "
                                       f"its log: {log_file}")
    if proc.returncode != 0:
        raise LaunchError("accelerate launch", proc.returncode, str(log_file), tail(log_file))
    return {"peak_rss_mb": usage.ru_maxrss / 1024}


def fsdp_on_cpu(job: Launchable) -> bool:
    """An FSDP accelerate config run on CPU (``use_cpu`` in the config or the training
    options, ``--cpu`` among the launch args): accelerate silently trains it as DDP."""
    assert job.launch is not None
    try:
        config, _ = read_recipe_file(job.launch["accelerate_config"], "an accelerate config", empty_ok=True)
    except RecipeFileError:
        return False  # accelerate says what is wrong with it
    if str(config.get("distributed_type", "")).upper() != "FSDP":
        return False
    return bool(config.get("use_cpu") or job.training_options().get("use_cpu") or "--cpu" in job.launch.get("args", []))


def _last_checkpoint(out: str) -> str:
    from fusion.train.checkpoints import complete_checkpoints

    folder = Path(out) / "checkpoints"
    done = complete_checkpoints(folder) if folder.is_dir() else []
    return f"its last checkpoint is {done[-1]}" if done else "no checkpoint was saved"


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
