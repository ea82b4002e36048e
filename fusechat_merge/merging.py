"""Running a mergekit merge safely: checked first, written atomically, never over inputs.

mergekit writes straight into the output directory, so an interrupted merge leaves a
directory with ``config.json`` and some shards that looks like a model. Here the merge is a
whole output of the one output lifecycle (`fusion.artifacts.lifecycle`, docs/outputs.md):
built in a hidden staging directory and published when complete; a killed run leaves only
that, which the next run into the same output removes. Its run record is the marker file
`OUTPUT_MARKER` (the recipe, flattened key by key, the models' fingerprints and the
options that change the output): a merge of the same recipe and models is left as it is,
another is refused naming what differs unless ``overwrite``.

Before any work:

* hub ids are resolved to their Hugging Face cache snapshot when cached (stock
  mergekit lists a repo's files through the hub API even then, so it fails offline);
* the output may not be, lie inside, or contain any model or tokenizer source of the
  recipe, and an existing output is touched only when it is an earlier output of this
  tool, known by `OUTPUT_MARKER` (both checked by the lifecycle);
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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from fusechat_merge import METHOD_NAME, __version__
from fusechat_merge.merge_card import describe_tied_head, restore_written_refs
from fusechat_merge.merge_recipe import validate_recipe
from fusion.artifacts.lifecycle import DONE, Output, writing
from fusion.artifacts.provenance import model_fingerprint
from fusion.artifacts.records import StoreError
from fusion.artifacts.weights import Weights, WeightsError
from fusion.artifacts.write_faults import write_fault
from fusion.errors import FusionError, InputError, causes
from fusion.names import HUB
from fusion.names import resolve as resolve_name
from fusion.runtime.log_capture import echo
from fusion.runtime.memory_faults import memory_faults_named, ran_out

OUTPUT_MARKER = ".fusechat-merge.json"
"""Written into every published merge: ``{"tool": "fusechat-merge", ...}``."""
TOOL = "fusechat-merge"
MARKER_VERSION = 2
"""2: the marker is the merge's run record (recipe keys, model fingerprints, options)."""
OUTPUT_OPTIONS = ("out_shard_size", "copy_tokenizer", "random_seed", "write_model_card", "safe_serialization",
                  "allow_crimes", "clone_tensors")
"""The mergekit options that change what a merge writes (the others change how it runs)."""
NOT_COMPARED = ("tool", "marker_version", "version", "mergekit_version", "recipe_sha256")


class MergeInputError(InputError):
    """A merge refused or stopped because of its inputs or output directory."""


def run_merge_checked(
    raw: Mapping[str, Any],
    out_path: str | os.PathLike[str],
    options: Any = None,
    *,
    config_source: str | None = None,
    source_name: str = "<recipe>",
    overwrite: bool = False,
) -> Path:
    """Check ``raw`` (a recipe mapping), then merge it atomically into ``out_path``.

    ``options`` is a `mergekit.options.MergeOptions` (defaults when None); ``overwrite``
    replaces an earlier merge of another recipe (see the module doc).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    validate_recipe(raw, source_name, text=config_source)
    config = MergeConfiguration.model_validate(dict(raw))
    return run_merge_atomic(config, out_path, options or MergeOptions(), config_source, overwrite=overwrite)


def run_merge_atomic(config, out_path, options, config_source: str | None = None, *, overwrite: bool = False) -> Path:
    """mergekit's ``run_merge`` through the output lifecycle: built in a staging directory,
    published when done (`fusion.artifacts.lifecycle.writing`)."""
    from mergekit import merge as mergekit_merge

    from fusechat_merge.mergekit_adapter import register

    register()
    run_merge = getattr(mergekit_merge.run_merge, "__wrapped__", mergekit_merge.run_merge)
    out = Path(os.path.normpath(Path(out_path).absolute()))  # a/../out is out
    recipe_hash = _recipe_hash(config)
    recipe = _flat(_plain_dump(config, exclude_none=True), "recipe")  # as written, before hub ids resolve
    if config_source is None:  # mergekit's own to_yaml fails on a path with a space
        import yaml

        config_source = yaml.safe_dump(_plain_dump(config, exclude_defaults=True), sort_keys=False,
                                       allow_unicode=True)
    config, sources = resolve_hub_models(config, getattr(options, "transformers_cache", None))
    output = Output(out, "the merged model", merge_record(config, recipe, sources, options, recipe_hash), whole=True,
                    reads={f"recipe's model {w}": p for w, p in sources.items()},
                    inputs={f"model {w}": f"the model {w} changed since this merge was made" for w in sources},
                    located=NOT_COMPARED, record_file=OUTPUT_MARKER, option="output directory")
    shard = getattr(options, "out_shard_size", None)
    less = ("--lazy-unpickle (lazy_unpickle), a smaller --out-shard-size (out_shard_size"
            + (f", now {shard:,} parameters" if isinstance(shard, int) else "") + "), or "
            "--cuda with --low-cpu-memory when the GPU has more memory than the CPU")
    try:
        with memory_faults_named(f"merging into {out}", lambda: "nothing of it was kept", lambda: less), \
                writing(output, overwrite=overwrite) as made:
            if made.state == DONE:
                echo(f"{out} already holds this merge (the same recipe, models and options): left as it is "
                     "(--overwrite merges again)")
            else:
                check_model_tensors(config, sources)
                _merge_into(made.dir, config, sources, options, config_source, run_merge)
    except (StoreError, InputError) as err:  # overlap, a full disk, out of memory, another merge into `out`
        raise MergeInputError(str(err)) from err
    return out


def merge_record(config, recipe: Mapping[str, Any], sources: Mapping[str, Path], options,
                 recipe_hash: str) -> dict[str, Any]:
    """What makes a merge what it is: the recipe key by key (so a refusal names the key),
    the content fingerprint of every local model, the options that change the output."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mergekit_version = version("mergekit")
    except PackageNotFoundError:
        mergekit_version = ""
    return {"tool": TOOL, "marker_version": MARKER_VERSION, "version": __version__,
            "mergekit_version": mergekit_version, "merge_method": config.merge_method,
            "recipe_sha256": recipe_hash, **recipe,
            **{f"model {w}": model_fingerprint(p) for w, p in sorted(sources.items())},
            **{f"option {k}": getattr(options, k) for k in OUTPUT_OPTIONS if hasattr(options, k)}}


def _flat(value: Any, key: str) -> dict[str, Any]:
    """``{"recipe.parameters.select_topk": 0.1, "recipe.models[0].model": ...}``."""
    if isinstance(value, dict) and value:
        return {k: v for name, item in value.items() for k, v in _flat(item, f"{key}.{name}").items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{key}[{i}]").items()}
    return {key: value}


def _merge_into(model_dir: Path, config, sources: Mapping[str, Path], options, config_source: str | None,
                run_merge: Callable[..., Any]) -> None:
    """mergekit's merge into ``model_dir`` (named as the output: mergekit names the model
    card after its directory), then the checks and fixes before it is published."""
    try:
        with _fresh_loaders():
            run_merge(config, str(model_dir), options=options, config_source=config_source)
    except Exception as err:
        message = None if write_fault(err, model_dir) or ran_out(err) else _input_fault(err)
        if message is None:
            raise
        raise MergeInputError(message) from err
    check_finite_output(model_dir, sources)
    describe_tied_head(model_dir, bool(getattr(options, "trust_remote_code", False)))
    restore_written_refs(model_dir, sources)


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
        refs = [name for name in fields if _holds_ref(getattr(obj, name))]  # field order, not a set's
        out = obj.model_dump(mode="json", exclude=set(refs), **how)
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
            run_merge_atomic(merge_config, out_path, options, config_source, overwrite=True)  # as mergekit-yaml
        except FusionError as err:  # mergekit-yaml is a click command: its way to say it, no traceback
            raise click.ClickException(str(err)) from err
        return None

    checked_run_merge._fusechat_wrapped = True  # type: ignore[attr-defined]
    return checked_run_merge
