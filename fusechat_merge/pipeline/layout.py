"""Every path of a pipeline run, in one place (the work directory's layout)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fusechat_merge.pipeline.stage_records import record_file, stage_file
from fusion.names import local_path, resolve


@dataclass(frozen=True)
class WorkDir:
    """``WORK/{logits,aligned,eval-logits,eval-aligned,targets,baselines,merges,eval,report,stages,logs}/...``; relative recipe
    paths resolve against ``root``."""

    root: Path

    def resolve(self, path: str) -> Path:
        return local_path(path, self.root)

    def model(self, ref: str) -> str:
        """A recipe's model as loaders take it: its local directory (a path, or a hub id's
        cached snapshot), else the hub id itself (downloaded when loaded)."""
        return resolve(ref, self.root).for_loader

    def data(self, ref: str) -> str:
        """A recipe's corpus: a local file or folder (relative to the work dir), else a hub
        dataset id as it is."""
        return resolve(ref, self.root, what="dataset").for_loader

    def store(self, model: str) -> Path:
        return self.root / "logits" / model

    def store_part(self, model: str, index: int) -> Path:
        """The store of one scoring part of ``model`` (``logits.parts``)."""
        return self.root / "logit-parts" / model / f"part-{index}"

    def aligned(self, source: str) -> Path:
        return self.root / "aligned" / source

    def eval_store(self, skill: str, model: str) -> Path:
        """``model``'s logit store of a held-out skill file (the transfer measure's input)."""
        return self.root / "eval-logits" / skill / model

    def eval_aligned(self, skill: str, source: str) -> Path:
        """``source``'s store of a held-out skill file aligned to the pivot's."""
        return self.root / "eval-aligned" / skill / source

    def target(self, seed: int, source: str) -> Path:
        return self.root / "targets" / f"seed-{seed}" / source

    def baseline(self, seed: int, name: str) -> Path:
        """A baseline model of one seed (``sft``, ``multi``)."""
        return self.root / "baselines" / f"seed-{seed}" / name

    def merged(self, seed: int, merge: str) -> Path:
        return self.root / "merges" / f"seed-{seed}" / merge

    def merge_report(self, seed: int, merge: str) -> Path:
        return self.root / "merges" / f"seed-{seed}" / f"{merge}-report"

    def scores(self, seed: int | None) -> Path:
        """Evaluation scores of the base models (``seed`` None) or of one seed's models."""
        return self.root / "eval" / ("base.json" if seed is None else f"seed-{seed}.json")

    def lm_eval_scores(self, seed: int | None, model: str) -> Path:
        """lm-eval's results JSON of one model (a base model, or one seed's target or merge)."""
        group = "base" if seed is None else f"seed-{seed}"
        return self.root / "eval" / "lm-eval" / group / f"{model.replace(':', '-')}.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def records(self) -> Path:
        return self.root / "stages"

    @property
    def datasets_cache(self) -> Path:
        return self.root / ".cache" / "datasets"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, stage_id: str) -> Path:
        """The log of a stage run in a subprocess or on a Ray worker."""
        return self.logs / (stage_file(stage_id) + ".log")

    def launch_config(self, stage_id: str) -> Path:
        """The training options a launched fuse stage hands to ``fusechat-merge fuse --config``."""
        return self.logs / (stage_file(stage_id) + ".fuse.yaml")

    @property
    def run_lock(self) -> Path:
        """Held by a whole run (exclusive) or by each ``run --stage`` (shared)."""
        return self.records / ".run.lock"

    def stage_lock(self, stage_id: str) -> Path:
        """Held by whoever runs the stage (this process, a Ray worker, a scheduler's job)."""
        return self.records / (stage_file(stage_id) + ".lock")

    def record(self, stage_id: str, kind: str) -> Path:
        """A stage's ``started`` or ``done`` record."""
        return record_file(self.records, stage_id, kind)
