"""Every stage's options, declared once: a field carries its default, help, choices and range.

`LogitOptions` (teacher logits), `AlignOptions` (alignment), `FusionSettings` (the fusion
part of training: `fusion.train.config.FusionConfig` is ``TrainingArguments`` plus these) and
`EvalOptions` (held-out evaluation); `LogitJob` and `StoreAlignment` are the first two with
what they read and write (one scoring run, one alignment), which a command and a pipeline
stage both run. A function along a stage's path that needs a default takes it from here
(`default_of`). The command line
(`fusechat_merge.option_forms.click_options`) and the pipeline recipe's sections
(`fusechat_merge.option_forms.recipe_section`) are generated from these fields, so a
default, a range or a help text cannot drift between them. Importing this module is cheap
(no numpy, no torch): the CLI builds its ``--help`` from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fusion.errors import InputError

# Ranges live beside the fields, not in their metadata: ``HfArgumentParser`` hands a
# field's metadata to argparse as keyword arguments (``help`` and ``choices`` are fine there,
# anything else is an error), and `FusionSettings` is part of a ``TrainingArguments``.
_BOUNDS: dict[int, dict[str, Any]] = {}


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    metavar: str | None = None,
    required: bool = False,
) -> Any:
    """A dataclass field with its help text and the values it accepts (``required``: the
    command line must give it although the dataclass has a default)."""
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    made = dataclasses.field(default=default, metadata=meta)
    _BOUNDS[id(made)] = {"min": min, "max": max, "min_open": min_open, "metavar": metavar,
                         "required": required}
    return made


def bounds(f: dataclasses.Field) -> dict[str, Any]:
    """``{"min", "max", "min_open", "metavar", "required"}`` of a field made with `option`."""
    return _BOUNDS[id(f)]


# The declared kinds whose values are checked (YAML and Python callers can pass anything).
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "bool": ((bool,), "true or false"), "int": ((int,), "an integer"), "float": ((int, float), "a number")}


def _kind_error(f: dataclasses.Field, value: Any) -> str | None:
    """What the value of a ``bool``/``int``/``float`` field (or ``X | None``) should be, when it is not."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    names = [part.strip() for part in text.split("|")]
    kinds = [n for n in names if n != "None"]
    if len(kinds) != 1 or kinds[0] not in _KINDS:
        return None
    types, words = _KINDS[kinds[0]]
    if value is None:
        return None if "None" in names else words
    if isinstance(value, types) and (kinds[0] == "bool" or not isinstance(value, bool)):
        return None
    return words


def check_options(options: Any) -> None:
    """Raise InputError (a ValueError) naming the first field whose value is not of its declared kind, or
    outside its choices or range."""
    for f in option_fields(type(options)):
        meta = f.metadata
        value = getattr(options, f.name)
        wrong = _kind_error(f, value)
        if wrong:
            raise InputError(f"{f.name} must be {wrong}, got {value!r}", key=f.name)
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            allowed = ", ".join(map(str, meta["choices"]))
            raise InputError(f"{f.name} must be one of {allowed}, got {value!r}", key=f.name)
        low, high, open_low = bounds(f)["min"], bounds(f)["max"], bounds(f)["min_open"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if low is not None and (value <= low if open_low else value < low):
            raise InputError(f"{f.name} must be {'>' if open_low else '>='} {low}, got {value!r}", key=f.name)
        if high is not None and value > high:
            raise InputError(f"{f.name} must be <= {high}, got {value!r}", key=f.name)


def option_fields(cls: type, exclude: Sequence[str] = ()) -> list[dataclasses.Field]:
    """The declared options of ``cls`` (fields made with `option`), in order."""
    return [f for f in dataclasses.fields(cls) if id(f) in _BOUNDS and f.name not in exclude]


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` → (i, N) with 0 ≤ i < N."""
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError as err:
        raise InputError(f"--shard must look like i/N (for example 0/4), got {spec!r}", key="shard") from err
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {spec}: need 0 <= i < N", key="shard")
    return index, count


TRUST_HELP = ("Allow a model that ships its own Python code (an auto_map in its config.json or "
              "tokenizer_config.json, e.g. InternLM2) to run it when it loads. Off: such a model is "
              "refused. The code runs with your rights: read the model's *.py files first.")

OVERWRITE_HELP = ("Start over: replace what the output holds from an earlier run of this command (only an "
                  "output of this tool, never another directory). Without it a run with the same inputs "
                  "and options resumes (or, finished, is left as it is) and one with other inputs or "
                  "options is refused naming what changed (docs/outputs.md).")

# --------------------------------------------------------------------------- logits

BACKENDS = ("hf", "vllm")
TEMPLATES = ("own", "shared")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' device_map strategies


@dataclass(kw_only=True, frozen=True)
class LogitOptions:
    """How a corpus is scored (``fusechat-merge logits`` options and the recipe's ``logits``)."""

    backend: str = option("hf", "hf: transformers, any device. vllm: vllm.LLM with prompt_logprobs "
                          "(CUDA).", choices=BACKENDS)
    top_k: int = option(10, "Entries kept per position (K).", min=1, max=1000)
    max_length: int = option(2048, "Tokens per conversation; longer ones are truncated.", min=2)
    template: str = option("own", "own: each model's chat template. shared: one role text for all "
                           "models (FuseChat's OpenChat-style template), as the reference code does.",
                           choices=TEMPLATES)
    batch_tokens: int = option(16384, "hf backend: padded tokens per forward pass (sequences × the "
                               "longest); length-sorted sequences fill each batch up to it, so short "
                               "ones go many to a batch and long ones few. 0: fixed batches of "
                               "batch_size.", min=0)
    batch_size: int = option(128, "hf backend: most sequences per forward pass (the batch itself when "
                             "batch_tokens is 0).", min=1)
    dtype: str = option("auto", "Model dtype (auto: bf16 on GPU, fp32 on CPU).", choices=DTYPES)
    device: str = option("auto", "hf backend: auto, cpu or cuda[:N].")
    device_map: str | None = option(None, "hf backend: spread a model too large for one GPU over all "
                                    "visible GPUs (then CPU) with accelerate's big-model loading "
                                    "(auto, balanced, balanced_low_0, sequential); replaces device.",
                                    choices=DEVICE_MAPS)
    shard: str = option("0/1", "i/N: score only the i-th of N contiguous blocks of rows (one per "
                        "machine or GPU); combine the stores with `fusechat-merge logits-merge`.")
    rows_per_shard: int = option(1024, "Sequences per store file; the unit of resumption.", min=1)
    strict: bool = option(False, "Fail on the first malformed row instead of skipping it.")
    tensor_parallel_size: int = option(1, "vllm backend: GPUs per model.", min=1)
    gpu_memory_utilization: float = option(0.9, "vllm backend: fraction of GPU memory vLLM may take.",
                                           min=0.05, max=1.0)
    engine_args: dict[str, Any] | None = option(None, "vllm backend: more vllm.EngineArgs, checked "
                                                "against the installed vLLM (max_num_batched_tokens, "
                                                "max_num_seqs, enforce_eager, kv_cache_dtype, ...); on "
                                                "the command line KEY=VALUE,KEY=VALUE.",
                                                metavar="KEY=VALUE,...")
    split: str = option("train", "Dataset split to read (hub datasets and folders).")
    cache_dir: str | None = option(None, "datasets cache directory.")
    trust_remote_code: bool = option(False, TRUST_HELP)
    overwrite: bool = option(False, OVERWRITE_HELP)

    def __post_init__(self) -> None:
        check_options(self)
        parse_shard(self.shard)
        if self.backend != "hf" and self.device_map is not None:
            raise InputError(f"device_map is for the hf backend; the {self.backend} backend spreads a "
                             "model with tensor_parallel_size", key="device_map")
        if self.backend != "vllm" and self.engine_args:
            raise InputError("engine_args are vllm.EngineArgs: they need backend vllm", key="engine_args")
        for name in ("tensor_parallel_size", "gpu_memory_utilization"):  # else dropped without a word
            if self.backend != "vllm" and getattr(self, name) != default_of(LogitOptions, name):
                raise InputError(f"{name} is for the vllm backend; the {self.backend} backend spreads a "
                                 "model with device_map", key=name)
        if self.device_map is not None and self.device != "auto":
            raise InputError(f"device {self.device} and device_map {self.device_map}: device_map places the "
                             "model itself, give one of them", key="device_map")


@dataclass(kw_only=True, frozen=True)
class LogitJob(LogitOptions):
    """One scoring run (`fusion.capture.logit_job.generate_logits`): a model over a corpus into
    a store, with its options."""

    model: str
    data: str
    out: str


def default_of(cls: type, name: str) -> Any:
    """The declared default of option ``name`` of ``cls``: what a function along the same path
    defaults to, so that a default is written once."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# --------------------------------------------------------------------------- align

METHODS = ("offsets", "dtw")
SWITCH = ("on", "off")
VOCAB_MODES = ("ms", "em", "mined")


@dataclass(kw_only=True, frozen=True)
class AlignOptions:
    """How a source is aligned to the pivot (``align`` options and the recipe's ``align``)."""

    method: str = option("offsets", "offsets: exact, from the stored character spans. dtw: the "
                         "paper's edit-distance DTW over token strings.", choices=METHODS)
    projection: str = option("on", "offsets: where the pivot's next token starts inside a source token, "
                             "use the source's stored entries that continue the text it already emitted "
                             "(byte-prefix projection) instead of falling back to the pivot's own "
                             "distribution. off: fall back, as before.", choices=SWITCH)
    vocab_mode: str = option("ms", "ms: mapping statistics (FuseChat). em: exact match. mined: "
                             "minimum edit distance.", choices=VOCAB_MODES)
    vocab_map: str | None = option(None, "A saved source→pivot vocabulary map (refused if made for "
                                   "other tokenizers); by default one is built from this corpus "
                                   "and saved in OUT.")
    trust_remote_code: bool = option(False, "Load the stores' tokenizers with their own code (see "
                                     "logits --trust-remote-code): " + TRUST_HELP)
    overwrite: bool = option(False, OVERWRITE_HELP)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(kw_only=True, frozen=True)
class StoreAlignment(AlignOptions):
    """One alignment (`fusion.align.job.align_stores`): a source store onto the pivot's store,
    into ``out``."""

    pivot: str
    source: str
    out: str
    pivot_model: str | None = None
    """Where the pivot's tokenizer is now (None: the model directory its store records)."""
    source_model: str | None = None
    """Where the source's tokenizer is now (None: the model directory its store records)."""


# --------------------------------------------------------------------------- fuse

FUSIONS = ("mince", "avgce", "token-mince")
LOSS_TYPES = ("ce", "kl")


@dataclass(kw_only=True)
class FusionSettings:
    lm_weight: float = option(0.9, "λ: weight of the causal-LM loss; 1 − λ weighs the fusion loss.",
                              min=0.0, max=1.0)
    fuse_temperature: float = option(1.0, "Temperature T of the teacher targets softmax(logprobs / T).",
                                     min=0.0, min_open=True)
    fusion: str = option("mince", "mince (per sequence), avgce (CE-weighted mixture) or token-mince "
                         "(per token).", choices=FUSIONS)
    fuse_loss_type: str = option("ce", "ce (soft cross-entropy) or kl.", choices=LOSS_TYPES)
    trust_remote_code: bool = option(False, "The pivot: " + TRUST_HELP)

    def check_fusion_settings(self) -> None:
        check_options(self)


# --------------------------------------------------------------------------- evaluate

@dataclass(kw_only=True)
class EvalOptions:
    """How held-out skills' reply loss is scored (the recipe's ``evaluate`` section, skills and
    lm-eval tasks aside; exact match is an lm-eval task, see `fusion.evaluate.lm_eval_tasks`)."""

    max_length: int = option(512, "Tokens per conversation; longer ones are truncated.", min=2)
    batch_size: int = option(16, "Conversations per forward pass.", min=1)
    trust_remote_code: bool = option(False, TRUST_HELP)

    def __post_init__(self) -> None:
        check_options(self)
