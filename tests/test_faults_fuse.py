"""`fusechat-merge fuse` on faulty inputs and resumes: exit code 1 with a message naming
the option, path or difference; user directories unchanged; a killed run, run again (it
resumes by default), ends with the weights of an uninterrupted run and no partial files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import BIN, killed_once, load_weights, refused, stray_files, tree_hash

from fusechat_merge.cli import main

TRAIN = ["--per-device-train-batch-size", "4", "--learning-rate", "1e-3", "--seed", "0",
         "--disable-tqdm", "true", "--lr-scheduler-type", "constant"]


def fuse(world, out: Path, *extra: str, pivot: Path | None = None):
    args = ["fuse", "--pivot", str(pivot or world["pivot"]), "--aligned", str(world["aligned"]),
            "--out", str(out), *TRAIN, *extra]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("where", ["pivot", "aligned"])
def test_an_output_that_is_or_lies_in_an_input_is_refused(world, where):
    before = tree_hash(world["root"])
    refused(fuse(world, world[where], "--max-steps", "1"), "--out", "is the")
    refused(fuse(world, world[where] / "target", "--max-steps", "1"), "lies inside")
    assert tree_hash(world["root"]) == before


@pytest.mark.parametrize(("flags", "words"), [
    (["--learning-rate", "-1"], ["learning_rate must be > 0"]),
    (["--max-steps", "0"], ["max_steps must be > 0"]),
    (["--per-device-train-batch-size", "0"], ["per_device_train_batch_size must be >= 1"]),
    (["--max-steps", "1", "--save-steps", "0"], ["save_steps must be > 0"]),
])
def test_invalid_training_values_are_refused_before_any_work(world, tmp_path, flags, words):
    refused(fuse(world, tmp_path / "t", *flags), *words)
    assert not (tmp_path / "t").exists()


def test_a_missing_pivot_says_so(world, tmp_path):
    result = fuse(world, tmp_path / "t", "--max-steps", "1", pivot=tmp_path / "nope")
    refused(result, f"pivot model path {tmp_path / 'nope'} does not exist")
    assert "huggingface.co" not in result.output and not (tmp_path / "t").exists()


def test_a_missing_aligned_store_says_so(world, tmp_path):
    result = CliRunner().invoke(main, ["fuse", "--pivot", str(world["pivot"]), "--aligned", str(tmp_path / "x"),
                                       "--out", str(tmp_path / "t"), "--max-steps", "1"])
    refused(result, f"store path {tmp_path / 'x'} does not exist")


def test_resume_refuses_checkpoints_of_another_configuration(world, tmp_path):
    out = tmp_path / "t"
    steps = ["--max-steps", "2", "--save-strategy", "steps", "--save-steps", "2"]
    assert fuse(world, out, *steps).exit_code == 0
    before = tree_hash(out)
    refused(fuse(world, out, *steps[:-4], "--max-steps", "4", "--save-strategy", "steps", "--save-steps", "2",
                 "--learning-rate", "5e-3", "--resume"),
            "other inputs or options", "learning_rate: 0.001 then, 0.005 now", "max_steps: 2 then, 4 now",
            "--overwrite")
    assert tree_hash(out) == before
    result = fuse(world, out, *steps)  # the same configuration, finished: left as it is
    assert result.exit_code == 0, result.output
    assert tree_hash(out) == before


def test_resume_at_max_steps_publishes_without_training_further(world, tmp_path):
    out = tmp_path / "t"
    steps = ["--max-steps", "2", "--save-strategy", "steps", "--save-steps", "1"]
    assert fuse(world, out, *steps).exit_code == 0
    weights = load_weights(out)
    saved = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert saved[-1] == "checkpoint-2"
    result = fuse(world, out, *steps, "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == saved
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    for name, value in load_weights(out).items():
        assert torch.equal(value, weights[name]), name


def test_resume_after_kill_gives_the_weights_of_an_uninterrupted_run(world, tmp_path):
    def args(out: Path, *extra: str) -> list[str]:
        return [str(BIN / "fusechat-merge"), "fuse", "--pivot", str(world["pivot"]), "--aligned",
                str(world["aligned"]), "--out", str(out), *TRAIN, "--max-steps", "40", "--save-strategy", "steps",
                "--save-steps", "4", *extra]

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(args(tmp_path / "clean"), env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    marker = killed / "checkpoints" / "checkpoint-8" / "checkpoint_complete.json"
    killed_once(args(killed), marker.exists, timeout=300)
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    subprocess.run(args(killed), env=env, check=True, capture_output=True, timeout=600)  # resumes by default
    clean, resumed = load_weights(tmp_path / "clean"), load_weights(killed)
    assert clean.keys() == resumed.keys()
    for name in clean:
        torch.testing.assert_close(resumed[name], clean[name], rtol=1e-5, atol=1e-7)
    assert stray_files(killed) == []
    names = sorted(p.name for p in (killed / "checkpoints").glob("checkpoint-*"))
    assert names == sorted(p.name for p in (tmp_path / "clean" / "checkpoints").glob("checkpoint-*"))
    assert all((killed / "checkpoints" / n / "checkpoint_complete.json").is_file() for n in names)


def test_a_training_option_given_twice_in_the_config_file_is_refused_with_both_lines(world, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 1.0e-3\nmax_steps: 2\nlearning_rate: 5.0e-3\n", encoding="utf-8")
    out = tmp_path / "target"
    refused(fuse(world, out, "--config", str(config)), str(config), "'learning_rate' is given twice",
            "line 1", "line 3")
    assert not out.exists()


def test_report_to_tensorboard_writes_the_training_curves(world, tmp_path):
    """``report_to`` works as in TrainingArguments: the progress bar and the logs do not
    replace the trackers (TensorBoard here: the dev extra installs it)."""
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "target"
    result = fuse(world, out, "--max-steps", "4", "--logging-steps", "1", "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    curves = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/clm_loss", "train/fuse_loss"} <= set(curves), curves
