"""One lifecycle for every output a command writes (docs/outputs.md).

An output declares what it is (`Output`): built in pieces that a rerun keeps (a store's
shards, a training's checkpoints) or built whole and published at the end (a merged model),
what it reads (its inputs' paths) and its run record (options and input fingerprints).
`writing` then does, in this order and the same way for every writer:

1. refuse an output that is, lies inside or contains one of its inputs (`refuse_overlap`);
2. take the output's lock (`fusion.artifacts.locks`): one writer at a time;
3. clean what a killed writer left: half-written temporary files in it, marked staging
   directories ``.NAME.partial-*`` and swapped-out ``.NAME.old-*`` beside it, and what the
   output says is its own leftover (an unfinished checkpoint);
4. compare the run record with the wanted one under one resume policy: what matches is
   resumed (or, when finished, left as it is); a record that differs is refused naming
   the difference, unless ``overwrite`` starts over (only an output of this tool is ever
   removed); a record with no piece written under it binds nothing and is replaced;
5. name write faults (full disk, read-only folder: `fusion.artifacts.write_faults`);
6. keep the complete pieces (an output made in pieces, its completion marker written
   last), or publish the whole directory atomically (`atomic.publish_dir`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion.artifacts.atomic import PARTIAL_INFIX, partial_dir, publish_dir, stale_temp_files
from fusion.artifacts.locks import locked
from fusion.artifacts.records import StoreError, differences, read_record, write_record
from fusion.artifacts.write_faults import write_faults_named
from fusion.errors import InputError

RUN_FILE = "run.json"
"""The run record of an output (a store, a training run)."""
MODEL_RUN_FILE = ".fusechat-run.json"
"""The run record of a model folder built whole (hidden: never part of the model's
fingerprint, `fusion.artifacts.provenance.model_fingerprint`)."""
PARTIAL_MARKER = ".fusechat-partial.json"
"""Written into every staging directory this tool creates (so only ours are removed)."""
OLD_INFIX = ".old-"
START_OVER = "rerun with --overwrite to start over, or choose another --out"
IGNORED = ("package_version",)
"""Record keys never compared: the version of this package that wrote it."""

NEW, RESUME, DONE = "new", "resume", "done"


def _no(_: Path) -> bool:
    return False


def _none(_: Path) -> list[Path]:
    return []


@dataclass(frozen=True)
class Output:
    """What an output is, what it reads and what made it (see the module doc)."""

    path: str | os.PathLike[str]
    what: str
    """How messages name it: ``the logit store``, ``the merged model``."""
    record: Mapping[str, Any]
    reads: Mapping[str, str | os.PathLike[str] | None] = field(default_factory=dict)
    """Input name → path; the output may not overlap any (hub ids are ignored)."""
    whole: bool = False
    """True: built in a staging directory and published at the end; False: built in place,
    piece by piece, each piece written atomically."""
    inputs: Mapping[str, str] = field(default_factory=dict)
    """Record keys that fingerprint an input → what their change means (said first)."""
    located: tuple[str, ...] = ()
    """Record keys that say where an input lay: kept for the reader, never compared."""
    record_file: str = RUN_FILE
    marks: tuple[str, ...] = ()
    """Other files that show a directory is an output of this tool (a store's manifest)."""
    pieces: Callable[[Path], bool] = _no
    """Whether the output holds a piece a resume can use (in pieces only)."""
    finished: Callable[[Path], bool] = _no
    """Whether the output (in pieces) is complete: nothing is left to write."""
    leftovers: Callable[[Path], list[Path]] = _none
    """What a killed writer of this output left in it beyond temporary files (removed)."""
    kept: Callable[[Path], str] | None = None
    """What of a failed run is kept, in words (default: said from ``pieces``)."""
    option: str = "--out"

    @property
    def out(self) -> Path:
        return Path(os.path.normpath(Path(self.path).expanduser().absolute()))

    def kept_now(self) -> str:
        """What of the output a failed run leaves for the next one, in words."""
        if self.kept is not None:
            return self.kept(self.out)
        if not self.whole and self.out.is_dir() and self.pieces(self.out):
            return "its complete pieces are kept: the same command resumes"
        return "nothing of it was kept"

    def ours(self, directory: Path) -> bool:
        return any((directory / name).is_file() for name in (self.record_file, *self.marks))


@dataclass
class Writing:
    """An output being written: ``state`` says whether it is `NEW`, resumed (`RESUME`) or
    already complete with the same record (`DONE`: nothing to write); ``dir`` is where the
    writer writes (the output itself, or the staging directory of a whole output)."""

    output: Output
    state: str
    dir: Path

    @property
    def out(self) -> Path:
        return self.output.out

    def staging(self, name: str) -> Path:
        """A marked staging directory beside the output, named the same in every process of
        a launch (``.NAME.partial-<name>``), for files published into it with `publish_files`."""
        directory = self.out.with_name(f".{self.out.name}{PARTIAL_INFIX}{name}")
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        mark_partial(directory, out=str(self.out))
        return directory

    def publish_files(self, staging: Path, *, last: tuple[str, ...] = ("config.json",)) -> None:
        """Move the files of ``staging`` into the output, ``last`` after the rest (a folder
        with config.json and weights looks like a model), then remove ``staging``."""
        (staging / PARTIAL_MARKER).unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: (p.name in last, p.name)):
            target = self.out / path.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            path.replace(target)
        staging.rmdir()


def overlap(out: Path, source: Path) -> str | None:
    """How the resolved path ``out`` relates to ``source``: ``is``, ``lies inside``,
    ``contains``, or None when writing ``out`` cannot touch ``source``."""
    if out == source:
        return "is"
    if source in out.parents:
        return "lies inside"
    if out in source.parents:
        return "contains"
    return None


def refuse_overlap(out: str | os.PathLike[str], reads: Mapping[str, str | os.PathLike[str] | None],
                   option: str = "--out") -> None:
    """Refuse an output that is, lies inside, or contains one of ``reads`` (name → path),
    naming both. Inputs that are not local paths (hub ids) are ignored."""
    target = Path(out).expanduser().resolve()
    for name, value in reads.items():
        if value is None:
            continue
        source = Path(value).expanduser()
        if not source.exists():
            continue
        relation = overlap(target, source.resolve())
        if relation is not None:
            remedy = {"is": "choose another output directory", "lies inside": "choose a directory outside it",
                      "contains": "choose a directory that does not"}[relation]
            where = "" if name.endswith(str(value)) else f" ({value})"
            raise InputError(f"{option} {out} {relation} the {name}{where}; an output never writes into "
                             f"or over its inputs: {remedy}")


def mark_partial(directory: Path, **info: Any) -> None:
    """Mark a staging directory as this tool's (with whatever ``info`` helps a reader)."""
    import json

    (directory / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), **info}), encoding="utf-8")


def remove_leftovers(output: Output) -> list[Path]:
    """Remove what a killed writer of ``output`` left (call it holding the output's lock: no
    live writer uses them then); returns them. Only this tool's: staging directories with
    `PARTIAL_MARKER`, swapped-out outputs with the output's record, temporary files."""
    out = output.out
    removed: list[Path] = []
    if out.parent.is_dir():
        for path in out.parent.glob(f".{out.name}{PARTIAL_INFIX}*"):
            if path.is_dir() and not path.is_symlink() and (path / PARTIAL_MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        for path in out.parent.glob(f".{out.name}{OLD_INFIX}*"):
            if path.is_dir() and not path.is_symlink() and output.ours(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    if out.is_dir():
        for path in [*stale_temp_files(out), *output.leftovers(out)]:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _settle_whole(output: Output, overwrite: bool) -> str:
    """`DONE` when ``out`` holds a complete output with the wanted record, else `NEW`
    (refused: a directory not ours, or one made with another record without ``overwrite``)."""
    out = output.out
    if out.exists() and not out.is_dir():
        raise StoreError(f"{output.option} {out} exists and is not a directory", "remove it or choose another")
    if not out.exists() or not any(out.iterdir()):
        return NEW
    if not output.ours(out):
        raise StoreError(f"{output.option} {out} is not empty and holds no output of this tool (no "
                         f"{output.record_file}); it is left as it is", "choose another directory")
    if overwrite:
        return NEW
    try:
        diffs = _differences(output, read_record(out / output.record_file))
    except StoreError as err:
        raise StoreError(err.reason, START_OVER.replace("--out", output.option)) from None
    if diffs:
        raise StoreError(f"{out} holds {output.what} made with other inputs or options ({'; '.join(diffs)})",
                         START_OVER.replace("--out", output.option))
    return DONE


def _settle_pieces(output: Output, overwrite: bool) -> str:
    """Create the output or check that a resumed one has the same record (see the module doc)."""
    out = output.out
    run_file = out / output.record_file
    if out.exists() and not out.is_dir():
        raise StoreError(f"{output.option} {out} is a file, not a directory", "remove it or choose another")
    if overwrite and out.exists() and any(out.iterdir()):
        if not output.ours(out):
            raise StoreError(f"--overwrite: {out} is not an output of this tool (no {output.record_file}); "
                             "refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if run_file.exists():
        try:
            diffs = _differences(output, read_record(run_file))
        except StoreError as err:
            raise StoreError(err.reason, START_OVER) from None
        if diffs and output.pieces(out):
            raise StoreError(f"{out} holds a run of {output.what} started with other inputs or options "
                             f"({'; '.join(diffs)})", START_OVER.replace("--out", output.option))
        if diffs:  # nothing was written under the old record: it binds nothing
            shutil.rmtree(out)
            out.mkdir(parents=True)
            write_record(run_file, output.record)
            return NEW
        return DONE if output.finished(out) else RESUME
    if any(out.iterdir()):
        raise StoreError(f"{out} is not empty and holds no run of this tool (no {output.record_file})",
                         "choose another " + output.option)
    write_record(run_file, output.record)
    return NEW


def _differences(output: Output, started: Mapping[str, Any]) -> list[str]:
    return differences(started, output.record, inputs=output.inputs, ignore=(*IGNORED, *output.located))


def _missing_parents(parent: Path) -> list[Path]:
    """The ancestors of ``parent`` (itself included) that do not exist yet, deepest first."""
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


@contextmanager
def writing(output: Output, *, overwrite: bool = False, main: bool = True) -> Iterator[Writing]:
    """Write ``output`` through the one lifecycle (the module doc's six steps).

    The block writes into ``Writing.dir`` unless ``state`` is `DONE`. ``main=False`` (the
    other processes of a launch) takes no lock and changes nothing on disk: it only says
    whether the output is `DONE`. A failed run removes what it created unless it got as far
    as a piece a resume can use, and the parent folders it had to make.
    """
    out = output.out
    refuse_overlap(out, output.reads, output.option)
    if not main:
        done = (output.finished(out) and (out / output.record_file).is_file()
                and not overwrite and not _differences(output, read_record(out / output.record_file)))
        yield Writing(output, DONE if done else RESUME, out)
        return
    created_parents = _missing_parents(out.parent)
    created = not out.exists()
    try:
        with write_faults_named(out, output.what, output.kept_now), locked(out, f"{output.what} {out}"):
            remove_leftovers(output)
            if output.whole:
                yield from _whole(output, overwrite)
            else:
                yield from _in_pieces(output, overwrite, created)
    except BaseException:
        for directory in created_parents:  # deepest first; one holding anything stays
            try:
                directory.rmdir()
            except OSError:
                break
        raise


def _whole(output: Output, overwrite: bool) -> Iterator[Writing]:
    out = output.out
    state = _settle_whole(output, overwrite)
    if state == DONE:
        yield Writing(output, DONE, out)
        return
    staging = partial_dir(out)
    try:
        mark_partial(staging, out=str(out))
        built = staging / out.name  # tools name things after their directory (a model card)
        built.mkdir()
        yield Writing(output, NEW, built)
        write_record(built / output.record_file, output.record)
        publish_dir(built, out, replace=True)
        shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _in_pieces(output: Output, overwrite: bool, created: bool) -> Iterator[Writing]:
    out = output.out
    try:
        state = _settle_pieces(output, overwrite)
        yield Writing(output, state, out)
    except BaseException:
        if created and out.is_dir() and not output.pieces(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
