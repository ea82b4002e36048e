"""Running a mergekit merge safely: checked first, written atomically, never over inputs.

mergekit writes straight into the output directory, so an interrupted merge leaves a
directory with ``config.json`` and some shards that looks like a model. Here the merge
goes to ``NAME`` inside a hidden sibling ``.NAME.partial-XXXX`` and is renamed into
place only when complete; a killed run leaves only that hidden directory, which the next run into the
same output removes.

Before any work:

* hub ids are resolved to their Hugging Face cache snapshot when cached (stock
  mergekit lists a repo's files through the hub API even then, so it fails offline);
* the output may not be, lie inside, or contain any model or tokenizer source of the
  recipe;
* an existing output is replaced only when it is an earlier output of this tool, known
  by the marker file `OUTPUT_MARKER` that only this tool writes;
* every safetensors header of every model is read (a corrupt file is named) and the
  tensor shapes are compared across the models (the model and tensor are named).

Input faults found then or during the merge (NaN weights, say) raise `MergeInputError`,
a `fusion.errors.FusionError`: a command line prints it and exits 1, without a traceback. After
the merge, before publishing, the output is scanned for non-finite values, whatever the
method (mergekit's own pass NaN through).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from fusechat_merge import METHOD_NAME, __version__
from fusechat_merge.merge_recipe import validate_recipe
from fusion.artifacts.atomic import partial_dir, publish_dir, write_fault
from fusion.artifacts.provenance import overlap
from fusion.artifacts.records import (
    StoreError,
    locked,
    mark_partial,
    remove_partials,
    write_faults_named,
)
from fusion.artifacts.weights import Weights, WeightsError
from fusion.errors import FusionError, InputError, causes
from fusion.names import HUB
from fusion.names import resolve as resolve_name
from fusion.runtime.memory_faults import memory_faults_named, ran_out

OUTPUT_MARKER = ".fusechat-merge.json"
"""Written into every published merge: ``{"tool": "fusechat-merge", ...}``."""
TOOL = "fusechat-merge"
MARKER_VERSION = 1


class MergeInputError(InputError):
    """A merge refused or stopped because of its inputs or output directory."""


def run_merge_checked(
    raw: Mapping[str, Any],
    out_path: str | os.PathLike[str],
    options: Any = None,
    *,
    config_source: str | None = None,
    source_name: str = "<recipe>",
) -> Path:
    """Check ``raw`` (a recipe mapping), then merge it atomically into ``out_path``.

    ``options`` is a `mergekit.options.MergeOptions` (defaults when None).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    validate_recipe(raw, source_name, text=config_source)
    config = MergeConfiguration.model_validate(dict(raw))
    return run_merge_atomic(config, out_path, options or MergeOptions(), config_source)


def run_merge_atomic(config, out_path, options, config_source: str | None = None) -> Path:
    """mergekit's ``run_merge`` into a temporary sibling, renamed into place when done."""
    from mergekit import merge as mergekit_merge

    from fusechat_merge.mergekit_adapter import register

    register()
    run_merge = getattr(mergekit_merge.run_merge, "__wrapped__", mergekit_merge.run_merge)
    out = Path(os.path.normpath(Path(out_path).absolute()))  # a/../out is out
    recipe_hash = _recipe_hash(config)
    if config_source is None:  # mergekit's own to_yaml fails on a path with a space
        import yaml

        config_source = yaml.safe_dump(_plain_dump(config, exclude_defaults=True), sort_keys=False,
                                       allow_unicode=True)
    config, sources = resolve_hub_models(config, getattr(options, "transformers_cache", None))
    check_output_dir(out, sources)
    check_model_tensors(config, sources)
    shard = getattr(options, "out_shard_size", None)
    less = ("--lazy-unpickle (lazy_unpickle), a smaller --out-shard-size (out_shard_size"
            + (f", now {shard:,} parameters" if isinstance(shard, int) else "") + "), or "
            "--cuda with --low-cpu-memory when the GPU has more memory than the CPU")
    try:
        with memory_faults_named(f"merging into {out}", lambda: "nothing of it was kept", lambda: less), \
                write_faults_named(out, "the merged model", lambda: "nothing of it was kept"):
            _merge_into(out, config, sources, options, config_source, recipe_hash, run_merge)
    except StoreError as err:  # a full disk, a read-only folder, out of memory, another merge into `out`
        raise MergeInputError(str(err)) from err
    return out


def _merge_into(out: Path, config, sources: Mapping[str, Path], options, config_source: str | None,
                recipe_hash: str, run_merge: Callable[..., Any]) -> None:
    """Merge holding ``out``'s lock; the parent folders it had to make go if it fails."""
    created = _make_parents(out.parent)
    try:
        with locked(out, f"merge output {out}"):
            _merge_locked(config, out, options, config_source, run_merge, sources, recipe_hash)
    except BaseException:
        _remove_created(created)
        raise


@contextlib.contextmanager
def _fresh_loaders() -> Iterator[None]:
    """mergekit keeps one tensor loader per model path for the life of the thread
    (``LoaderCache``): a model rewritten at the same path (a target trained again, in the
    same process) would be read through the old file's handles. Each merge opens its own."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.loaders.clear()
    try:
        yield
    finally:
        cache.loaders.clear()


def _merge_locked(config, out: Path, options, config_source: str | None, run_merge: Callable[..., Any],
                  sources: Mapping[str, Path], recipe_hash: str) -> None:
    remove_stale_partials(out)
    partial = partial_dir(out)
    mark_partial(partial, tool=TOOL, version=__version__, out=str(out))
    model_dir = partial / out.name  # mergekit names the model card after its directory
    try:
        model_dir.mkdir()
        try:
            with _fresh_loaders():
                run_merge(config, str(model_dir), options=options, config_source=config_source)
        except Exception as err:
            message = None if write_fault(err, out) or ran_out(err) else _input_fault(err)
            if message is None:
                raise
            raise MergeInputError(message) from err
        check_finite_output(model_dir, sources)
        describe_tied_head(model_dir, bool(getattr(options, "trust_remote_code", False)))
        _restore_written_refs(model_dir, sources)
        _write_output_marker(model_dir, config, recipe_hash)
        publish_dir(model_dir, out, replace=True)  # with the user's umask
        shutil.rmtree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _remove_created(created: list[Path]) -> None:
    """Remove the (empty) parent directories a failed merge created, deepest first."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            break


# --- hub ids --------------------------------------------------------------------------


def _map_model_refs(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` (a mergekit config object) with ``fn`` applied to every ModelReference."""
    from mergekit.common import ModelReference
    from pydantic import BaseModel

    if isinstance(obj, ModelReference):
        return fn(obj)
    if isinstance(obj, BaseModel):
        changes = {}
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            new = _map_model_refs(value, fn)
            if new is not value:
                changes[name] = new
        return obj.model_copy(update=changes) if changes else obj
    if isinstance(obj, list | tuple):
        items = [_map_model_refs(x, fn) for x in obj]
        return type(obj)(items) if any(a is not b for a, b in zip(items, obj, strict=True)) else obj
    if isinstance(obj, dict):
        items = {k: _map_model_refs(v, fn) for k, v in obj.items()}
        return items if any(items[k] is not obj[k] for k in obj) else obj
    return obj


def resolve_hub_models(config, cache_dir: str | None = None) -> tuple[Any, dict[str, Path]]:
    """Replace cached hub ids in ``config`` by their snapshot directories.

    Local paths become absolute. Returns the new config and {reference as written: local
    directory} for every model and tokenizer source found on disk. A hub id that is neither local nor cached is an
    error offline; online it is left to mergekit (which downloads it).
    """
    from mergekit.common import ModelPath

    sources: dict[str, Path] = {}
    problems: list[str] = []
    base_dir = Path.cwd()

    def resolve(ref):
        written = str(ref.model)
        found = resolve_name(written, base_dir, cache_dir=cache_dir)
        problem = found.problem()
        if problem is not None:
            problems.append(f"{written}: {problem}")
            return ref
        if found.kind == HUB or found.path is None:
            return ref
        local = found.path
        sources[written] = local
        # absolute: mergekit's model card asks the hub about relative paths ``a/b``
        if ref.model.path == str(local.absolute()):
            return ref
        return ref.model_copy(update={"model": ModelPath(path=str(local.absolute()))})

    resolved = _map_model_refs(config, resolve)
    if problems:
        raise MergeInputError("cannot find the recipe's models:\n" + "\n".join(f"  - {p}" for p in problems))
    return resolved, sources


# --- the output directory -------------------------------------------------------------


def is_merge_output(path: Path) -> bool:
    """True when ``path`` is a merge this tool published (it holds `OUTPUT_MARKER`)."""
    return _read_marker(path / OUTPUT_MARKER) is not None


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def check_output_dir(out: Path, sources: Mapping[str, Path]) -> None:
    """Refuse an output that overlaps an input, or an existing directory not ours."""
    real = out.resolve()
    for written, local in sources.items():
        relation = overlap(real, local.resolve())
        if relation is not None:
            where = "" if str(local) == written else f" ({local})"
            raise MergeInputError(
                f"output directory {out} {relation} the recipe's model {written}{where}; "
                "a merge never writes into or over its inputs: choose another output directory"
            )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise MergeInputError(f"output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not is_merge_output(out):
        raise MergeInputError(
            f"output directory {out} is not empty and holds no previous merge of {TOOL} "
            f"(no {OUTPUT_MARKER}); it is left as it is: choose another directory"
        )


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the hidden directories of killed runs into ``out`` (call it holding ``out``'s
    lock); returns them: marked ``.NAME.partial-*`` staging directories, and ``.NAME.old-*``
    earlier outputs (with `OUTPUT_MARKER`) a killed publish left."""
    removed = remove_partials(out)
    for path in out.parent.glob(f".{out.name}.old-*") if out.parent.is_dir() else []:
        if path.is_dir() and not path.is_symlink() and is_merge_output(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; returns those created, deepest first."""
    missing = []
    path = parent
    while not path.exists():
        missing.append(path)
        path = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def _plain_dump(obj: Any, **how: bool) -> Any:
    """``obj`` (a mergekit config object) as plain JSON data, every model reference as its
    string; pydantic dumps the rest. mergekit's serializer hands back a reference whose path
    holds a space or a quote as the object itself, which pydantic refuses ("Circular
    reference detected")."""
    from mergekit.common import ModelReference
    from pydantic import BaseModel

    if isinstance(obj, ModelReference):
        return str(obj)
    if isinstance(obj, BaseModel):
        fields = type(obj).model_fields
        refs = {name for name in fields if _holds_ref(getattr(obj, name))}
        out = obj.model_dump(mode="json", exclude=refs, **how)
        for name in refs:
            if not (how.get("exclude_defaults") and getattr(obj, name) == fields[name].default):
                out[name] = _plain_dump(getattr(obj, name), **how)
        return out
    if isinstance(obj, list | tuple):
        return [_plain_dump(x, **how) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain_dump(v, **how) for k, v in obj.items()}
    return obj


def _holds_ref(obj: Any) -> bool:
    found: list[Any] = []
    _map_model_refs(obj, lambda ref: found.append(ref) or ref)
    return bool(found)


def _recipe_hash(config) -> str:
    dumped = _plain_dump(config, exclude_none=True)
    text = json.dumps(dumped, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_CARD_LIST = "The following models were included in the merge:\n"


def _restore_written_refs(model_dir: Path, sources: Mapping[str, Path]) -> None:
    """The model card names the models as the recipe does, not by resolved directory,
    and lists them in a fixed order (mergekit lists a set: the order changed per run)."""
    for name in ("README.md", "mergekit_config.yml"):
        path = model_dir / name
        if not path.is_file():
            continue
        text = original = path.read_text(encoding="utf-8")
        for written, local in sorted(sources.items(), key=lambda kv: -len(str(kv[1]))):
            if str(local.absolute()) != written:
                text = text.replace(str(local.absolute()), written)
        if name == "README.md":
            text = _sorted_card_list(text)
        if text != original:
            path.write_text(text, encoding="utf-8")


def _sorted_card_list(text: str) -> str:
    start = text.find(_CARD_LIST)
    if start < 0:
        return text
    start += len(_CARD_LIST)
    lines = text[start:].split("\n")
    count = next((i for i, line in enumerate(lines) if not line.startswith("* ")), len(lines))
    return text[:start] + "\n".join(sorted(lines[:count]) + lines[count:])


def _write_output_marker(directory: Path, config, recipe_hash: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mergekit_version = version("mergekit")
    except PackageNotFoundError:
        mergekit_version = ""
    marker = {
        "tool": TOOL,
        "marker_version": MARKER_VERSION,
        "version": __version__,
        "mergekit_version": mergekit_version,
        "merge_method": config.merge_method,
        "recipe_sha256": recipe_hash,
    }
    (directory / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


# --- the models' tensors --------------------------------------------------------------


def check_finite_output(model_dir: Path, sources: Mapping[str, Path]) -> None:
    """Refuse a merged model with NaN or inf weights before it is published, naming the
    tensor and the input models that hold non-finite values in it.

    `fusechat_sce` checks its inputs as it goes; mergekit's own methods (linear, TIES, …)
    pass NaN through into a model that loads and then produces NaN. The scan reads the
    just-written output once (usually still in the page cache)."""
    import torch

    with Weights(model_dir) as weights:
        for key in weights:
            if not bool(torch.isfinite(weights.get(key)).all()):
                culprits = _models_with_non_finite(key, sources)
                where = (f"; non-finite in the input {'model' if len(culprits) == 1 else 'models'} "
                         + ", ".join(culprits)) if culprits else " (the inputs are finite there: the method overflowed)"
                raise MergeInputError(f"the merged tensor {key!r} has non-finite values (NaN or inf){where}; "
                                      "nothing was written")


def describe_tied_head(model_dir: Path, trust_remote_code: bool = False) -> None:
    """Make ``config.json``'s ``tie_word_embeddings`` say what the merged weights hold.

    mergekit copies the base model's config: a tied base merged with untied targets says
    ``true`` beside a separate output head, which a loader that ties then drops (and the
    reverse leaves a missing head to random initialisation)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = model_dir / "config.json"
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if not hasattr(config, "tie_word_embeddings"):
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    names = [f"{n}.weight" for n, module in model.named_modules(remove_duplicate=False) if module is head]
    if head is None or not names:
        return
    with Weights(model_dir) as weights:
        has_head = any(name in weights for name in names)
    if bool(config.tie_word_embeddings) == has_head:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        raw["tie_word_embeddings"] = not has_head
        config_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _models_with_non_finite(key: str, sources: Mapping[str, Path]) -> list[str]:
    import torch

    found = []
    for name, directory in sources.items():
        if not Path(directory).is_dir():
            continue
        try:
            with Weights(directory) as weights:
                if key in weights and not bool(torch.isfinite(weights.get(key)).all()):
                    found.append(str(directory) if str(directory) == name else f"{name} ({directory})")
        except WeightsError:
            continue
    return found


def read_tensor_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """{tensor name: (shape, file)} of every weight file (safetensors: headers only); a bad
    file is named."""
    try:
        with Weights(model_dir) as weights:
            return {name: (weights.shape(name), weights.file(name)) for name in weights}
    except WeightsError as err:
        raise MergeInputError(str(err)) from err


def check_model_tensors(config, sources: Mapping[str, Path]) -> None:
    """Read every model's safetensors headers and compare tensor shapes across models.

    A vocabulary axis (first axis of size ``vocab_size``) may differ: mergekit aligns it
    with the recipe's tokenizer settings (checked by `validate_recipe`).
    """
    from fusechat_merge.merge_recipe import _vocab_size

    order: list[str] = []

    def collect(ref):
        written = str(ref.model)
        if written not in order:
            order.append(written)
        return ref

    if config.base_model is not None:
        collect(config.base_model)
    _map_model_refs(config, collect)
    merged = {str(r.model) for r in config.referenced_models()}  # not the tokenizer source
    by_local = {str(local): written for written, local in sources.items()}
    models: list[tuple[str, dict[str, tuple[tuple[int, ...], Path]], int | None]] = []
    for written in order:
        name = by_local.get(written, written)
        local = sources.get(name)
        if local is None or written not in merged:
            continue  # a hub id mergekit will download
        try:
            vocab = _vocab_size(json.loads((local / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            vocab = None
        models.append((name, read_tensor_shapes(local), vocab))
    problems: list[str] = []
    seen: dict[str, tuple[str, tuple[int, ...], int | None]] = {}
    for name, shapes, vocab in models:
        for tensor, (shape, _) in shapes.items():
            if tensor not in seen:
                seen[tensor] = (name, shape, vocab)
                continue
            first, first_shape, first_vocab = seen[tensor]
            if shape == first_shape or _vocab_axis_only(shape, vocab, first_shape, first_vocab):
                continue
            problems.append(
                f"tensor {tensor!r} of model {name} has shape {list(shape)}, "
                f"but in {first} it has {list(first_shape)}"
            )
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise MergeInputError(
            "the models' tensor shapes differ (the models must share architecture and sizes):\n"
            + "\n".join(f"  - {p}" for p in problems[:5])
            + more
        )


def _vocab_axis_only(a: tuple[int, ...], vocab_a: int | None, b: tuple[int, ...], vocab_b: int | None) -> bool:
    return (
        len(a) == len(b) >= 1
        and a[1:] == b[1:]
        and vocab_a is not None
        and vocab_b is not None
        and a[0] == vocab_a
        and b[0] == vocab_b
    )


def _input_fault(err: BaseException) -> str | None:
    """The message for an error a merge raised because of its inputs (None: a bug)."""
    from fusechat_merge.sce import SCEInputError

    chain = list(causes(err))
    for e in chain:
        if isinstance(e.__cause__, SCEInputError):
            return str(e)
    for e in chain:
        kind = type(e)
        module = kind.__module__ or ""
        if kind.__name__ == "SafetensorError":
            return f"a safetensors file of the recipe's models cannot be read: {e}"
        if module.startswith("huggingface_hub") and kind.__name__.endswith(("NotFoundError", "Error")):
            return f"cannot fetch a model from the Hugging Face hub: {e}"
        if isinstance(e, ValueError) and str(e).startswith("Tensor size mismatch"):
            return f"the models' tensor shapes differ: {e}"
    return None


# --- stock mergekit -------------------------------------------------------------------


def _uses_fusechat_sce(config) -> bool:
    if config.merge_method == METHOD_NAME:
        return True
    modules = config.modules or {}
    return any(getattr(m, "merge_method", None) == METHOD_NAME for m in modules.values())


def wrap_run_merge(run_merge: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap mergekit's ``run_merge`` (by the import hook): ``fusechat_sce`` recipes are
    checked before loading and written atomically; other recipes pass through."""
    if getattr(run_merge, "_fusechat_wrapped", False):
        return run_merge

    @functools.wraps(run_merge)
    def checked_run_merge(merge_config, out_path, options, config_source=None, **kwargs):
        if kwargs or not _uses_fusechat_sce(merge_config):
            return run_merge(merge_config, out_path, options, config_source, **kwargs)
        import yaml

        raw = yaml.safe_load(config_source) if config_source else None
        if not isinstance(raw, dict):
            raw = merge_config.model_dump(exclude_none=True, mode="json")
        try:
            validate_recipe(raw, "(mergekit-yaml recipe)", text=config_source)
            run_merge_atomic(merge_config, out_path, options, config_source)
        except FusionError as err:  # mergekit-yaml is a click command: its way to say it, no traceback
            raise click.ClickException(str(err)) from err
        return None

    checked_run_merge._fusechat_wrapped = True  # type: ignore[attr-defined]
    return checked_run_merge
