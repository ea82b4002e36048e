"""The whole-run recipe: one YAML describing a FuseChat run, validated before any work.

Relative paths are resolved against the run's work directory. Errors name the YAML key
and its line (`PipelineRecipeError`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from fusechat_merge.option_forms import recipe_section
from fusechat_merge.recipe_keys import (
    RecipeFileError,
    key_path,
    line_map,
    read_recipe_file,
)
from fusion.data.chat_templates import has_chat_template
from fusion.errors import InputError
from fusion.names import HUB, MISSING, joined, local_path, model_problem, resolve
from fusion.options import TEMPLATES, AlignOptions, EvalOptions, LogitOptions, default_of
from fusion.runtime.remote_code import needs_remote_code, remote_code_risk

STAGES = ("logits", "align", "fuse", "merge", "evaluate")
EXECUTORS = ("local", "ray")  # `run --executor`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The scoring engine is per model (a 72B source needs tensor parallelism, a 7B one does not):
# these LogitOptions fields are keys of each model entry, with their choices and ranges.
# `trust_remote_code` too: it is allowed model by model, and every stage that loads the
# model (logits, align, fuse, merge, evaluate, lm-eval) gets it from there.
ENGINE_FIELDS = ("backend", "device_map", "tensor_parallel_size", "gpu_memory_utilization", "engine_args",
                 "trust_remote_code")
_EngineSpec = recipe_section(
    LogitOptions, name="_EngineSpec",
    exclude=tuple(f.name for f in dataclasses.fields(LogitOptions) if f.name not in ENGINE_FIELDS),
)


_MODEL_KEY = ("trust_remote_code is a key of a model's entry (pivot or a source), not of a stage: "
              "every stage that loads that model gets it from there")

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_MAX = 100
"""The longest model or merge name: names make folder and file names (a stage's records are
``stages/evaluate__lm-eval__seed-N__target-NAME.progress.json``), which file systems limit to
255 bytes."""


def _plain_name(value: str) -> str:
    """Names become path components under the work dir: no separators, no '..', no '__'
    (it stands for '/' in a stage's file names), at most `NAME_MAX` characters."""
    if not PLAIN_NAME.match(value) or ".." in value or "__" in value:
        raise ValueError(f"{value!r} is not a plain name (letters, digits, '.', '_', '-'; no '/', '..' or '__')")
    if len(value) > NAME_MAX:
        raise ValueError(f"a name of {len(value)} characters ({value[:20]}...); at most {NAME_MAX}: "
                         "names make folder and file names")
    return value


class ModelSpec(_EngineSpec):  # type: ignore[misc,valid-type]
    name: Annotated[str, AfterValidator(_plain_name)] = Field(
        description="Short name used for outputs and reports (a plain name: it names folders).")
    model: str = Field(description="Model directory (or hub id) with its tokenizer.")
    template: Literal[TEMPLATES] = default_of(LogitOptions, "template")  # type: ignore[valid-type]
    parts: int | None = Field(None, ge=1, description="Scoring parts of this model (over `logits.parts`).")


class DataSpec(_Strict):
    train: str = Field(description="Conversations scored by every model and used for fusion.")
    split: str = default_of(LogitOptions, "split")


# Options that the run sets itself (per model, per stage) are not recipe keys here.
_LogitOptionsSpec = recipe_section(
    LogitOptions, name="_LogitOptionsSpec",
    exclude=("template", "shard", "split", "cache_dir", "overwrite", *ENGINE_FIELDS))


class LogitSpec(_LogitOptionsSpec):  # type: ignore[misc,valid-type]
    parts: int = Field(1, ge=1, description=(
        "Score each model's corpus in this many parts, stages `logits/<model>/part-<i>` (each "
        "with its own resources; at once under `--executor ray`), combined into `logits/<model>` "
        "(the store an unsplit run makes). A model's own `parts` key overrides it."))

    def options(self) -> dict[str, Any]:
        """The scoring options (`LogitOptions` fields), without the pipeline's own keys."""
        return self.model_dump(exclude={"parts"})
# `overwrite` is the pipeline's own business: it redoes a changed stage from an empty output.
# trust_remote_code is a model key (each model's entry), not a stage's.
AlignSpec = recipe_section(AlignOptions, name="AlignSpec", exclude=("overwrite", "trust_remote_code"))


class LaunchSpec(_Strict):
    """How a fuse stage is launched: ``accelerate launch --config_file ACCELERATE_CONFIG
    --num_processes N ... -m fusechat_merge.cli fuse ...`` in a subprocess."""

    accelerate_config: str | None = Field(
        None, description="An accelerate config file (recipes/accelerate/*.yaml); a relative path "
        "is relative to the recipe file.")
    num_processes: int | None = Field(None, ge=1, description="Training processes (default: the config's).")
    main_process_port: int = Field(0, ge=0, le=65535, description="0: a free port (one node).")
    args: list[str] = Field(default_factory=list, description="More `accelerate launch` arguments.")


class BaselinesSpec(_Strict):
    """The paper's baselines, trained per seed beside the targets and evaluated like them."""

    sft: bool = Field(False, description="SFT: the pivot trained on the same corpus and steps, "
                      "CLM alone (`lm_weight: 1`); report rows of kind `sft`.")
    multi: bool = Field(False, description="Multi: all sources fused into one model at once "
                        "(every aligned store in one training); report rows of kind `multi`.")


BASELINES = ("sft", "multi")  # their report names, and their folder names under WORK/baselines


class FuseSpec(_Strict):
    baselines: BaselinesSpec = Field(default_factory=BaselinesSpec)
    defaults: dict[str, Any] = Field(default_factory=dict, description="FusionConfig fields for every pair.")
    per_source: dict[str, dict[str, Any]] = Field(default_factory=dict)
    launch: LaunchSpec | None = Field(None, description="Run every fuse stage under accelerate launch.")
    per_source_launch: dict[str, LaunchSpec] = Field(
        default_factory=dict, description="Per source: keys that override `launch` for its pairs.")

    def launch_for(self, source: str) -> LaunchSpec | None:
        """``launch`` with the keys set in ``per_source_launch[source]`` on top (None: in-process)."""
        own = self.per_source_launch.get(source)
        if own is None:
            return self.launch
        base = self.launch.model_dump() if self.launch else {}
        return LaunchSpec(**{**base, **own.model_dump(exclude_unset=True)})

    @field_validator("defaults")
    @classmethod
    def _known_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_training_keys(value)  # one block: a mapping value is an option's (lr_scheduler_kwargs)
        return value

    @field_validator("per_source")
    @classmethod
    def _known_per_source(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for block in value.values():  # source name → its block (names are checked with the sources)
            _check_training_keys(block)
        return value


# Training options the run sets itself: given in `fuse`, they would be replaced without a word.
RUN_SETS = {"seed": "the run trains one target per seed of the recipe's `seeds`; list the seeds there",
            "output_dir": "the run puts each target in WORK/targets/seed-S/SOURCE"}


def _check_training_keys(block: dict[str, Any]) -> None:
    from fusion.train.config import FusionConfig

    if "trust_remote_code" in block:
        raise ValueError(_MODEL_KEY)
    known = {f.name for f in dataclasses.fields(FusionConfig)}
    unknown = sorted(set(block) - known)
    if unknown:
        hint = (" (per-source blocks go under fuse.per_source)"
                if all(isinstance(block[k], dict) for k in unknown) else "")
        raise ValueError(f"unknown training option(s) {', '.join(unknown)} (TrainingArguments "
                         f"fields plus lm_weight, fuse_temperature, fusion, fuse_loss_type){hint}")
    for key in block:
        if key in RUN_SETS:
            raise ValueError(f"{key} cannot be set here: {RUN_SETS[key]}")


class MergeSpec(_Strict):
    name: Annotated[str, AfterValidator(_plain_name)]
    method: str = "fusechat_sce"
    parameters: dict[str, Any] = Field(default_factory=dict)
    model_parameters: dict[str, Any] = Field(default_factory=dict, description="Per-target parameters (weight, density).")
    base: bool = Field(True, description="Use the pivot as base model (false for linear).")
    dtype: str = "float32"


REPORT_FIELDS = ("source_skills", "diagnostics")  # evaluate keys of the report alone


class EvalSpec(recipe_section(EvalOptions, exclude=("trust_remote_code",))):  # type: ignore[misc]
    skills: dict[str, str] = Field(default_factory=dict, description="skill name → held-out conversations")
    source_skills: dict[str, str] = Field(
        default_factory=dict, description="source → its own skill (a key of skills), for the "
        "fusion effect; default: the skill named like the source.")
    diagnostics: bool = Field(True, description="Write the fusion diagnostics into the report "
                              "(update norms, alignment, MinCE picks, the fusion loss's share).")
    lm_eval: dict[str, Any] | None = Field(
        None, description="lm-evaluation-harness tasks scored on every model of the run "
        "(`fusion.evaluate.lm_eval_options.LmEvalOptions` fields: tasks, include_path, num_fewshot, "
        "apply_chat_template, limit, ...); include_path is relative to the work dir.")

    @field_validator("lm_eval")
    @classmethod
    def _lm_eval_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from fusion.evaluate.lm_eval_options import LmEvalError, LmEvalOptions

            if "trust_remote_code" in value:
                raise ValueError(_MODEL_KEY)

            try:
                LmEvalOptions.from_mapping(value, where="lm_eval")
            except (LmEvalError, TypeError) as err:
                raise ValueError(str(err)) from err
        return value


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class ResourceSpec(_Strict):
    """What one stage asks of the scheduler (a Ray task's resources; `run --plan` prints them)."""

    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    memory: int | None = Field(None, gt=0, description="Bytes of RAM (or a size such as 64GiB).")

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return _size(value)


def _size(value: Any) -> Any:
    """Bytes, or a size such as ``64GiB`` or ``512MB``, as bytes."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected bytes or a size such as 64GiB or 512MB, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class ResourcesSpec(_Strict):
    """Resources per stage kind, and per stage id (``stages: {logits/qwen: {num_gpus: 8}}``)."""

    logits: ResourceSpec = Field(default_factory=ResourceSpec)
    align: ResourceSpec = Field(default_factory=ResourceSpec)
    fuse: ResourceSpec = Field(default_factory=ResourceSpec)
    merge: ResourceSpec = Field(default_factory=ResourceSpec)
    evaluate: ResourceSpec = Field(default_factory=ResourceSpec)
    stages: dict[str, ResourceSpec] = Field(default_factory=dict, description="Per stage id, over its kind's.")
    gpu_memory: int | None = Field(None, gt=0, description=(
        "Memory of one GPU (bytes, or a size such as 80GiB): every stage's estimated memory per "
        "device is checked against it before the run (default: this machine's GPU, if any)."))

    @field_validator("gpu_memory", mode="before")
    @classmethod
    def _gpu_size(cls, value: Any) -> Any:
        return _size(value)

    def for_stage(self, stage_id: str, kind: str) -> dict[str, Any]:
        """The resources of one stage (its kind's, with the keys its own entry sets on top)."""
        values = getattr(self, kind).model_dump()
        if stage_id in self.stages:
            values.update(self.stages[stage_id].model_dump(exclude_unset=True))
        return values


class PipelineRecipe(_Strict):
    name: str = "fusechat"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    pivot: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1)
    data: DataSpec
    logits: LogitSpec = Field(default_factory=LogitSpec)
    align: AlignSpec = Field(default_factory=AlignSpec)
    fuse: FuseSpec = Field(default_factory=FuseSpec)
    merges: list[MergeSpec] = Field(default_factory=lambda: [MergeSpec(name="sce")])
    evaluate: EvalSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    retries: int = Field(2, ge=0, description="Times a stage lost with its Ray worker or node is submitted "
                         "again (resuming); `run --retries` overrides it. A stage's own error is not retried.")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        repeated = sorted({s for s in value if value.count(s) > 1})
        if repeated:  # each would train and count twice: "± 0 over 2 seeds"
            raise ValueError(f"seed {', '.join(map(str, repeated))} is listed twice; list each seed once")
        return value

    def model_names(self) -> list[str]:
        return [self.pivot.name] + [s.name for s in self.sources]


class PipelineRecipeError(InputError):
    """A pipeline recipe that cannot run; ``problems`` lists every reason, each naming its key and line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid pipeline recipe {source}:\n" + "\n".join(f"  - {p}" for p in problems),
                         file=source)


def load_pipeline_recipe(path: str | Path, work_dir: str | Path) -> PipelineRecipe:
    """Parse and validate; then check that files, models and methods exist (no loading)."""
    path = Path(path)
    try:
        raw, text = read_recipe_file(path)
    except RecipeFileError as problem:
        raise PipelineRecipeError(str(path), [str(problem)]) from problem
    lines = line_map(text)
    try:
        recipe = PipelineRecipe.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
            where = f" (line {line})" if line else ""
            problems.append(f"{_where(loc)}{where}: {e['msg']}")
        raise PipelineRecipeError(str(path), problems) from err
    recipe = _launch_paths_from(recipe, path.absolute().parent)
    problems = check_resources(recipe, Path(work_dir), lines)
    if problems:
        raise PipelineRecipeError(str(path), problems)
    return recipe


def _launch_paths_from(recipe: PipelineRecipe, folder: Path) -> PipelineRecipe:
    """Accelerate configs ship beside the recipes: a relative one is relative to the recipe file."""
    def absolute(spec: LaunchSpec | None) -> LaunchSpec | None:
        if spec is None or spec.accelerate_config is None:
            return spec
        return spec.model_copy(update={"accelerate_config": str(local_path(spec.accelerate_config, folder))})

    fuse = recipe.fuse.model_copy(update={
        "launch": absolute(recipe.fuse.launch),
        "per_source_launch": {k: absolute(v) for k, v in recipe.fuse.per_source_launch.items()}})
    return recipe.model_copy(update={"fuse": fuse})


def _where(loc: tuple[Any, ...]) -> str:
    return key_path(loc) or "<top level>"


def check_resources(recipe: PipelineRecipe, work_dir: Path, lines: dict) -> list[str]:
    """Every problem found before any work: missing models, tokenizers, chat templates and
    data; every stage's options (training options and values, merge methods and parameters);
    duplicate names."""
    problems: list[str] = []

    def at(*loc: Any) -> str:  # a key the recipe leaves out takes the line of its nearest parent
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        return f"{_where(loc)}{f' (line {line})' if line else ''}"

    names = recipe.model_names()
    if len(set(names)) != len(names):
        problems.append(f"{at('sources')}: model names must be unique, got {names}")
    for baseline in BASELINES:
        if getattr(recipe.fuse.baselines, baseline) and baseline in names:
            problems.append(f"{at('fuse', 'baselines', baseline)}: a model is named {baseline!r}, "
                            "the baseline's report name; rename it")
    specs = [(("pivot",), recipe.pivot)] + [(("sources", i), s) for i, s in enumerate(recipe.sources)]
    for loc, spec in specs:
        try:  # the engine options of the model's backend only (another's would be dropped)
            LogitOptions(**{name: getattr(spec, name) for name in ENGINE_FIELDS})
        except ValueError as err:
            problems.append(f"{at(*loc, 'backend')}: {err}")
        found = resolve(spec.model, work_dir)
        if found.kind == HUB or found.path is None:
            continue  # a hub id, not cached: its stage downloads it, or fails in seconds without the hub
        local = found.path
        if found.kind == MISSING:
            problems.append(f"{at(*loc, 'model')}: {found.problem()}")
            continue
        if (problem := model_problem(local)) is not None:
            problems.append(f"{at(*loc, 'model')}: model path {local}{joined(problem)}")
        if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            problems.append(f"{at(*loc, 'model')}: {local} has no tokenizer (tokenizer.json)")
        elif spec.template == "own" and not has_chat_template(local):
            problems.append(f"{at(*loc, 'template')}: {spec.model} has no chat template; set "
                            "`template: shared` (one role text for all models) for it")
        if not spec.trust_remote_code and needs_remote_code(local):
            key = _where((*loc, "trust_remote_code"))
            problems.append(f"{at(*loc, 'model')}: {remote_code_risk(spec.model, local, f'`{key}: true`')}")
    data = resolve(recipe.data.train, work_dir, what="dataset")
    if data.kind == MISSING:
        problems.append(f"{at('data', 'train')}: {data.problem()}")
    for skill, file in (recipe.evaluate.skills.items() if recipe.evaluate else []):
        if not local_path(file, work_dir).exists():
            problems.append(f"{at('evaluate', 'skills', skill)}: {local_path(file, work_dir)} does not exist")
    for source, skill in (recipe.evaluate.source_skills.items() if recipe.evaluate else []):
        if source not in names[1:]:
            problems.append(f"{at('evaluate', 'source_skills', source)}: no source named {source!r}")
        elif skill not in recipe.evaluate.skills:  # type: ignore[union-attr]
            problems.append(f"{at('evaluate', 'source_skills', source)}: no skill named {skill!r} in "
                            "evaluate.skills")
    include = (recipe.evaluate.lm_eval or {}).get("include_path") if recipe.evaluate else None
    if include and not local_path(include, work_dir).is_dir():
        problems.append(f"{at('evaluate', 'lm_eval', 'include_path')}: {local_path(include, work_dir)} is not a folder")
    for section in ("per_source", "per_source_launch"):
        for name in getattr(recipe.fuse, section):
            if name not in names[1:]:
                problems.append(f"{at('fuse', section, name)}: no source named {name!r}")
    launch_problems: list[str] = []
    for source in recipe.sources:
        launch = recipe.fuse.launch_for(source.name)
        own = source.name in recipe.fuse.per_source_launch
        where = ("fuse", "per_source_launch", source.name) if own else ("fuse", "launch")
        if launch is None:
            continue
        if launch.accelerate_config is None:
            launch_problems.append(f"{at(*where)}: no accelerate_config for source {source.name!r}")
        elif not Path(launch.accelerate_config).is_file():
            launch_problems.append(f"{at(*where, 'accelerate_config')}: {launch.accelerate_config} does not exist")
        else:
            try:
                read_recipe_file(launch.accelerate_config, "an accelerate config", empty_ok=True)
            except RecipeFileError as err:
                launch_problems.append(f"{at(*where, 'accelerate_config')}: {launch.accelerate_config}: {err}")
    problems += list(dict.fromkeys(launch_problems))  # one line per recipe key
    from fusechat_merge.merge_recipe import check_merge_settings

    for i, merge in enumerate(recipe.merges):
        for key, message in check_merge_settings(merge.method, dict(merge.parameters),
                                                 dict(merge.model_parameters), base=merge.base,
                                                 n_models=len(recipe.sources)):
            problems.append(f"{at('merges', i, *key)}: {message}")
    problems += _check_training_options(recipe, at)
    merge_names = [m.name for m in recipe.merges]
    if len(set(merge_names)) != len(merge_names):
        problems.append(f"{at('merges')}: merge names must be unique, got {merge_names}")
    return problems


def unavailable_models(recipe: PipelineRecipe, work_dir: str | Path) -> dict[str, str]:
    """The recipe's hub ids that are neither local nor in the Hugging Face cache while the
    hub cannot be reached (``HF_HUB_OFFLINE``, no network): id → what to say, naming its
    recipe key. The check cannot refuse them (a plan made offline runs where the hub
    answers); a run refuses them before any stage that reads one starts."""
    specs = [("pivot.model", recipe.pivot)] + [(f"sources[{i}].model", s) for i, s in enumerate(recipe.sources)]
    found = [(key, resolve(spec.model, work_dir)) for key, spec in specs]
    return {name.name: f"{key}: {why}" for key, name in found if name.kind == HUB and (why := name.problem())}


_MACHINE_FLAGS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval", "use_cpu")


def _check_training_options(recipe: PipelineRecipe, at: Any) -> list[str]:
    """Each pair's training options as a `FusionConfig` would take them (values, not only names).

    Precision flags are left to the machine that trains (bf16 and tf32 need a GPU there,
    not on the machine that checks the recipe)."""
    from fusion.train.config import fusion_config

    problems = []
    blocks = [(("fuse", "defaults"), {})] + [(("fuse", "per_source", n), o) for n, o in recipe.fuse.per_source.items()]
    for loc, extra in blocks:
        try:
            settings = {**recipe.fuse.defaults, **extra}
            for flag in _MACHINE_FLAGS:
                settings.pop(flag, None)
            fusion_config("/nonexistent/fusechat-check", **settings)
        except (ValueError, TypeError) as err:
            problems.append(f"{at(*loc)}: {err}")
    return problems
