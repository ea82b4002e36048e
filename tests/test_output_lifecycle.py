"""The one output lifecycle (`fusion.artifacts.lifecycle`, docs/outputs.md), writer by writer
through the CLI: ``logits``, ``align``, ``fuse``, ``merge`` and ``logits-merge`` each

(a) rerun over what a killed run left (a half-written shard or checkpoint, a staging
    directory, the stale lock of a dead process) resume or republish, and the result
    equals an uninterrupted run's;
(b) refuse an output whose run record differs, naming the difference;
(c) refuse an output inside an input, naming both;
(d) start over with ``--overwrite``.

Tiny models made here; stores of 6 rows; 2 training steps."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import load_weights, refused, sce_recipe, stray_files, tree_hash, write_recipe

from fusechat_merge.cli import main
from fusion.artifacts.lifecycle import PARTIAL_MARKER, RUN_FILE
from fusion.artifacts.locks import lock_path

TRAIN = ["--per-device-train-batch-size", "4", "--learning-rate", "1e-3", "--seed", "0", "--disable-tqdm", "true",
         "--lr-scheduler-type", "constant", "--max-steps", "2", "--save-strategy", "steps", "--save-steps", "1"]
DEAD_PID = 2**22 + 4321  # above Linux's pid_max: no such process


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("lifecycle")
    data = write_jsonl(root / "chats.jsonl", conversations(6))
    pivot = make_model(root / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    source = make_model(root / "source", base=pivot, seed=2, delta_scale=0.05)
    w = {"root": root, "data": data, "pivot": pivot, "source": source}
    for name, model in (("pivot", pivot), ("source", source)):
        ok(cli(*logits_args(w, root / f"s-{name}", model)))
    for i in range(2):
        ok(cli(*logits_args(w, root / f"p{i}", pivot), "--shard", f"{i}/2"))
    ok(cli("align", "--pivot", root / "s-pivot", "--source", root / "s-source", "--out", root / "aligned"))
    write_recipe(root / "recipe.yaml", sce_recipe([pivot, source], select_topk=0.5))
    write_recipe(root / "other.yaml", sce_recipe([pivot, source], select_topk=0.2))
    return w


def logits_args(w, out: Path, model: Path | None = None) -> list:
    return ["logits", "--model", model or w["pivot"], "--data", w["data"], "--out", out, "--top-k", "4",
            "--rows-per-shard", "2", "--cache-dir", w["root"] / "cache"]


@dataclass(frozen=True)
class Writer:
    """How to run one writer into ``out`` (with extra flags), and what a test needs of it."""

    name: str
    command: Callable[[dict, Path], list]
    changed: list[str]  # flags that change its record
    difference: str  # how the refusal names that change
    inside: Callable[[dict], tuple[Path, str]]  # an input to write into, and how it is named
    killed: Callable[[Path], None]  # what a killed run leaves in (or beside) a finished output
    record: Callable[[Path], dict]  # the published run record


def store_record(out: Path) -> dict:
    return json.loads((out / RUN_FILE).read_text())


def killed_store(out: Path) -> None:
    """A scoring or alignment killed while writing its last shard: no manifest, the shard a
    temporary file."""
    (out / "manifest.json").unlink()
    last = sorted(out.glob("shard-*.arrow"))[-1]
    last.rename(last.with_name(f".{last.name}.tmp-{DEAD_PID}-0badf00d"))


def killed_training(out: Path) -> None:
    """A training killed while saving its second checkpoint, before publishing."""
    for path in out.iterdir():
        if path.name not in (RUN_FILE, "checkpoints"):
            path.unlink()
    (out / "checkpoints" / "checkpoint-2" / "checkpoint_complete.json").unlink()
    staging(out, "final")


def killed_whole(out: Path) -> None:
    """A whole output killed while its next build was being staged (and its record kept by
    a swapped-out copy a killed publish left)."""
    shutil.copytree(out, out.with_name(f".{out.name}.old-dead1234"))
    shutil.rmtree(out)
    built = staging(out, "dead1234") / out.name
    built.mkdir()
    (built / "model-00001-of-00002.safetensors").write_bytes(b"half")


def staging(out: Path, suffix: str) -> Path:
    directory = out.with_name(f".{out.name}.partial-{suffix}")
    directory.mkdir()
    (directory / PARTIAL_MARKER).write_text(json.dumps({"pid": DEAD_PID, "out": str(out)}))
    (directory / "junk.bin").write_bytes(b"half")
    return directory


WRITERS = [
    Writer("logits", lambda w, out: logits_args(w, out),
           ["--top-k", "3"], "top_k: 4 then, 3 now",
           lambda w: (w["pivot"], "model directory"), killed_store, store_record),
    Writer("align", lambda w, out: ["align", "--pivot", w["root"] / "s-pivot", "--source", w["root"] / "s-source",
                                    "--out", out],
           ["--method", "dtw"], "align_method: 'offsets' then, 'dtw' now",
           lambda w: (w["root"] / "s-pivot", "pivot store"), killed_store, store_record),
    Writer("fuse", lambda w, out: ["fuse", "--pivot", w["pivot"], "--aligned", w["root"] / "aligned", "--out", out,
                                   *TRAIN],
           ["--learning-rate", "5e-3"], "learning_rate: 0.001 then, 0.005 now",
           lambda w: (w["root"] / "aligned", "aligned store"), killed_training, store_record),
    Writer("merge", lambda w, out: ["merge", w["root"] / "recipe.yaml", out, "--quiet"],
           [], "recipe.parameters.select_topk: 0.5 then, 0.2 now",
           lambda w: (w["source"], "recipe's model"), killed_whole,
           lambda out: json.loads((out / ".fusechat-merge.json").read_text())),
    Writer("logits-merge", lambda w, out: ["logits-merge", w["root"] / "p0", w["root"] / "p1", "--out", out],
           [], "the part stores changed since this store was combined",
           lambda w: (w["root"] / "p0", "part 1 of 2"), killed_whole, store_record),
]


def run(w, writer: Writer, out: Path, *extra) -> object:
    args = writer.command(w, out)
    if writer.name == "merge" and "--other" in extra:  # the changed recipe
        args[1] = w["root"] / "other.yaml"
        extra = tuple(e for e in extra if e != "--other")
    if writer.name == "logits-merge" and "--other" in extra:  # parts scored with another K
        args[1:3] = [w["root"] / "q0", w["root"] / "q1"]
        extra = tuple(e for e in extra if e != "--other")
    return cli(*args, *extra)


def changed(w, writer: Writer) -> list[str]:
    if writer.name == "logits-merge" and not (w["root"] / "q1").exists():
        for i in range(2):
            ok(cli(*logits_args(w, w["root"] / f"q{i}"), "--shard", f"{i}/2", "--top-k", "3"))
    return writer.changed or ["--other"]


def result_of(writer: Writer, out: Path) -> dict:
    """What must equal between an uninterrupted and a resumed run (measurements aside)."""
    if writer.name == "fuse":
        return dict(load_weights(out))
    return {k: v for k, v in tree_hash(out).items() if k != "scoring.json"}


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_a_killed_run_is_resumed_or_republished_as_an_uninterrupted_one(world, tmp_path, writer):
    clean, killed = tmp_path / "clean" / "out", tmp_path / "killed" / "out"
    ok(run(world, writer, clean))
    ok(run(world, writer, killed))
    writer.killed(killed)
    lock_path(killed).write_text(json.dumps({"pid": DEAD_PID, "host": "gone", "since": 0, "command": "killed"}))
    ok(run(world, writer, killed))  # no flag: resuming is the default
    want, got = result_of(writer, clean), result_of(writer, killed)
    assert want.keys() == got.keys()
    for name in want:
        if isinstance(want[name], torch.Tensor):
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
        else:
            assert got[name] == want[name], name
    assert stray_files(killed.parent) == [] and not lock_path(killed).exists()


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_a_different_record_is_refused_naming_the_difference_and_overwrite_starts_over(world, tmp_path, writer):
    out = tmp_path / "out"
    ok(run(world, writer, out))
    first = writer.record(out)
    before = tree_hash(out)
    ok(run(world, writer, out))  # the same record: resumed (finished: left as it is)
    assert tree_hash(out) == before or writer.name in ("logits", "align")  # a store rewrites its measurements
    flags = changed(world, writer)
    refused(run(world, writer, out, *flags), writer.difference, "--overwrite", str(out))
    assert tree_hash(out) == before or writer.name in ("logits", "align")
    ok(run(world, writer, out, *flags, "--overwrite"))
    assert writer.record(out) != first
    assert stray_files(out.parent) == []


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_an_output_inside_an_input_is_refused_naming_both(world, writer):
    source, named = writer.inside(world)
    before = tree_hash(world["root"])
    out = source / "sub"
    result = run(world, writer, out)
    refused(result, "lies inside", named, str(source))
    assert str(out) in " ".join(result.output.split()) or str(out) in result.output
    assert not out.exists() and tree_hash(world["root"]) == before


def test_fuse_keeps_accepting_resume_for_old_scripts(world, tmp_path):
    out = tmp_path / "t"
    ok(run(world, WRITERS[2], out, "--resume"))
    assert (out / "config.json").is_file() and (out / RUN_FILE).stat().st_size > 0


@pytest.mark.parametrize("command", [w.name for w in WRITERS])
def test_every_writing_command_has_the_same_overwrite_flag(command):
    text = " ".join(ok(cli(command, "--help")).output.split())
    assert "--overwrite Start over: replace what the output holds from an earlier run" in text
    assert ("--resume" in text) == (command == "fuse")
