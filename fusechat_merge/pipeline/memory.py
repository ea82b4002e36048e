"""Memory per device of each stage, estimated before the run, and the check that it fits.

A user who rents GPUs for a recipe learns here, before any stage runs, what each stage
needs on each of its GPUs and whether that fits the GPU memory the recipe declares
(``resources.gpu_memory``, or the local GPU's when there is one):

* a scoring stage (``logits``): its weights at the stage's dtype split over
  ``tensor_parallel_size`` (vLLM) or over the stage's GPUs (``hf`` with ``device_map``), one
  sequence's KV cache, and the float32 logits of the positions it scores; vLLM may take only
  ``gpu_memory_utilization`` of each GPU;
* a training stage (``fuse``): weights, gradients and optimizer state as accelerate's
  ``estimate-memory`` counts them for the precision (`accelerate.commands.estimate.
  estimate_training_usage`), each sharded over the launch's processes as its accelerate
  config says (FSDP ``FULL_SHARD``/``SHARD_GRAD_OP``, DeepSpeed ZeRO 1/2/3, offload), plus the
  activations of one micro-batch (``per_device_train_batch_size`` × ``logits.max_length``,
  all layers, or one layer's and every layer's input with ``gradient_checkpointing``) and
  its float32 logits;
* an evaluation (``evaluate``): the largest model's float32 weights and one batch's logits.

Model sizes come from accelerate's `calculate_maximum_sizes` on the model built on the
``meta`` device from its config (no weights read, no memory taken). A model that is not
on disk (a hub id not cached) has no estimate. Activation counts are per token and layer
(``8·hidden + 4·intermediate`` values saved for the backward pass of a Llama-style block,
attention through SDPA, no ``seq²`` term): an estimate, see docs/cluster.md for how close it
came to measured peaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from fusion.names import is_model_dir

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto on a GPU: bf16


@dataclass(frozen=True)
class ModelShape:
    """What the estimate reads of a model: its float32 size (accelerate) and its shape."""

    fp32_bytes: int
    largest_layer: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_dim: int  # key/value heads × head size


@dataclass
class Estimate:
    """Bytes per device, by part; ``devices``: how many devices share the stage."""

    parts: dict[str, int]
    devices: int
    budget_share: float = 1.0  # of each GPU the stage may use (vLLM's gpu_memory_utilization)
    notes: list[str] = field(default_factory=list)

    @property
    def per_device(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        inner = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.per_device / GiB:.2f} GiB per device × {self.devices} ({inner})"

    def as_dict(self) -> dict[str, Any]:
        return {"per_device_gib": round(self.per_device / GiB, 3), "devices": self.devices,
                "parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()}}


@cache
def model_shape(model_dir: str, trust_remote_code: bool = False) -> ModelShape | None:
    """The shape of the model in ``model_dir`` (None: not on disk, or its config unreadable)."""
    import torch
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    if not is_model_dir(Path(model_dir)):
        return None
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        # on the meta device: no memory, and 20× faster than accelerate's init_empty_weights
        # (which hooks every parameter's registration) for a 7B model
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32)
    except Exception:  # a model the estimate cannot build is left to its stage to load (or refuse)
        return None
    total, (largest, _) = calculate_maximum_sizes(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1))
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    experts = int(getattr(text, "num_experts_per_tok", 1) or 1)  # a MoE token visits top-k experts
    return ModelShape(int(total), int(largest), hidden, int(text.num_hidden_layers), intermediate * experts,
                      int(text.vocab_size), kv_heads * head_dim)


def scoring_estimate(shape: ModelShape, *, backend: str, dtype: str, tensor_parallel_size: int,
                     gpu_memory_utilization: float, max_length: int, batch_tokens: int, gpus: int) -> Estimate:
    """A logits stage: weights split over its GPUs, a KV cache (vLLM), activations, logits."""
    width = DTYPE_BYTES[dtype]
    weights = shape.fp32_bytes * width // 4
    if backend == "vllm":
        tp = tensor_parallel_size
        kv = 2 * shape.layers * shape.kv_dim * width * (max_length + 1) // tp
        # prompt_logprobs: the float32 logits of every scored position of the longest sequence
        logits = (max_length + 1) * shape.vocab * 4 * 2 // tp
        return Estimate({"weights": weights // tp, "kv cache (one sequence)": kv, "prompt logits": logits},
                        tp, budget_share=gpu_memory_utilization)
    devices = max(1, int(gpus))
    tokens = batch_tokens or max_length
    activations = tokens * (2 * shape.hidden + shape.intermediate) * width  # inference: one layer live
    logits = min(tokens, 2048) * shape.vocab * 4 * 2  # the head in chunks of 2048 positions, float32
    return Estimate({"weights": weights // devices, "activations": activations, "logits": logits}, devices)


@dataclass(frozen=True)
class Sharding:
    """How a launch shards training state over its processes (from its accelerate config)."""

    processes: int
    weights: bool = False
    gradients: bool = False
    optimizer: bool = False
    offload: tuple[str, ...] = ()  # parts kept on CPU
    name: str = "none (every process holds a full copy)"


def sharding_of(launch: dict[str, Any] | None) -> Sharding:
    """The sharding of a fuse stage's ``launch`` (None: in-process, one device)."""
    if not launch:
        return Sharding(1, name="in-process (one device)")
    config: dict[str, Any] = {}
    if launch.get("accelerate_config"):
        from fusechat_merge.recipe_keys import read_recipe_file

        config, _ = read_recipe_file(launch["accelerate_config"], "an accelerate config", empty_ok=True)
    processes = int(launch.get("num_processes") or config.get("num_processes") or 1)
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        strategy = str(fsdp.get("fsdp_sharding_strategy", "")).upper()
        if not strategy:  # FSDP2 names it by resharding after forward (default: full shard)
            strategy = "FULL_SHARD" if fsdp.get("fsdp_reshard_after_forward", True) else "SHARD_GRAD_OP"
        full = strategy in ("FULL_SHARD", "1", "HYBRID_SHARD", "4")
        none = strategy in ("NO_SHARD", "3")
        offload = ("weights", "gradients", "optimizer") if fsdp.get("fsdp_offload_params") else ()
        return Sharding(processes, full, not none, not none, offload, f"FSDP {strategy} over {processes}")
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        stage, offload = int(ds.get("zero_stage", 0) or 0), []
        if ds.get("deepspeed_config_file"):
            file = Path(ds["deepspeed_config_file"])
            if file.is_file():
                zero = json.loads(file.read_text(encoding="utf-8")).get("zero_optimization", {})
                stage = int(zero.get("stage", stage))
                if (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"):
                    offload.append("optimizer")
                if (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme"):
                    offload.append("weights")
        if (ds.get("offload_optimizer_device") or "none") != "none":
            offload.append("optimizer")
        if (ds.get("offload_param_device") or "none") != "none":
            offload.append("weights")
        return Sharding(processes, stage >= 3, stage >= 2, stage >= 1, tuple(offload),
                        f"DeepSpeed ZeRO-{stage} over {processes}")
    return Sharding(processes, name=f"{kind} over {processes} (every process holds a full copy)")


def training_estimate(shape: ModelShape, settings: dict[str, Any], sharding: Sharding, max_length: int) -> Estimate:
    """A fuse stage: accelerate's training counts sharded as ``sharding`` says, plus activations."""
    from accelerate.commands.estimate import estimate_training_usage

    mixed = bool(settings.get("bf16") or settings.get("fp16"))
    usage = estimate_training_usage(shape.fp32_bytes, "bfloat16" if mixed else "float32")
    n = sharding.processes
    weights = usage["model"] // (n if sharding.weights else 1)
    if mixed and sharding.optimizer and not sharding.weights and "DeepSpeed" in sharding.name:
        # ZeRO-1/2: 16-bit weights on every GPU; the float32 master copy is sharded with the optimizer
        weights = usage["model"] // 2 + usage["model"] // n
    parts = {"weights": weights,
             "gradients": usage["gradients"] // (n if sharding.gradients else 1),
             "optimizer": usage["optimizer"] // (n if sharding.optimizer else 1)}
    for name in sharding.offload:
        parts[name] = 0
    if sharding.weights:  # a sharded model gathers one layer's full weights at a time
        parts["gathered layer"] = shape.largest_layer
    batch = int(settings.get("per_device_train_batch_size", 8))
    tokens = batch * max_length
    width = 2 if mixed else 4
    per_layer = tokens * (8 * shape.hidden + 4 * shape.intermediate) * width
    if settings.get("gradient_checkpointing"):
        parts["activations"] = shape.layers * tokens * shape.hidden * 4 + per_layer
    else:
        parts["activations"] = shape.layers * per_layer
    parts["logits"] = tokens * shape.vocab * 4 * 3  # float32 logits, their log-softmax and gradient
    return Estimate(parts, n)


def what_would_fit(shape: ModelShape, settings: dict[str, Any], sharding: Sharding, max_length: int,
                   budget: int) -> list[str]:
    """The least changes that bring a fuse stage under ``budget`` bytes per GPU: the
    activation settings alone, then with weights, gradients and optimizer state sharded over
    the fewest GPUs that suffice (ZeRO-3/FSDP), each with its estimate."""
    steps: list[dict[str, Any]] = [{}]
    if not settings.get("gradient_checkpointing"):
        steps.append({"gradient_checkpointing": True})
    if int(settings.get("per_device_train_batch_size", 8)) > 1:
        steps.append({**steps[-1], "per_device_train_batch_size": 1})
    options: list[str] = []
    for extra in steps:
        tried = {**settings, **extra}
        words = [f"{k}: {str(v).lower()}" for k, v in extra.items()]
        if "per_device_train_batch_size" in extra:
            words[-1] += " (raise gradient_accumulation_steps to keep the global batch)"
        if extra and training_estimate(shape, tried, sharding, max_length).per_device <= budget:
            options.append(f"{', '.join(words)} ({_gib(training_estimate(shape, tried, sharding, max_length))} "
                           "per GPU)")
            break
        for n in (2, 4, 8, 16, 32, 64, 128):
            if n <= sharding.processes and sharding.weights:
                continue
            full = Sharding(n, True, True, True, name=f"ZeRO-3/FSDP over {n}")
            estimate = training_estimate(shape, tried, full, max_length)
            if estimate.per_device <= budget:
                shard = (f"shard weights, gradients and optimizer state over {n} GPUs with FSDP FULL_SHARD or "
                         f"ZeRO-3 (fuse.launch: {{accelerate_config: accelerate/fsdp.yaml, num_processes: {n}}}, "
                         f"resources.fuse.num_gpus: {n})")
                options.append(", ".join([shard, *words]) + f" ({_gib(estimate)} per GPU)")
                break
        if len(options) >= 2:
            break
    options.append("GPUs with more memory (resources.gpu_memory)")
    return options


def _gib(estimate: Estimate) -> str:
    return f"{estimate.per_device / GiB:.1f} GiB"


def declared_gpu_memory(declared: int | None) -> tuple[int | None, str]:
    """Bytes of one GPU: the recipe's ``resources.gpu_memory``, else the local GPU's (when this
    process sees one), else None (no check)."""
    if declared:
        return declared, "resources.gpu_memory"
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), "this machine's GPU 0"
    return None, ""


def stage_estimate(stage: Any, max_length: int) -> Estimate | None:
    """The estimate of one planned stage (None: no GPU stage, or its model not on disk)."""
    from fusechat_merge.pipeline.jobs import EvalJob, FuseJob, LogitsJob

    job = stage.job
    if isinstance(job, LogitsJob):
        spec = job
        shape = model_shape(str(spec.model), spec.trust_remote_code)
        if shape is None:
            return None
        gpus = stage.resources.get("num_gpus", 0) if spec.device_map else 1
        return scoring_estimate(shape, backend=spec.backend, dtype=spec.dtype,
                                tensor_parallel_size=spec.tensor_parallel_size,
                                gpu_memory_utilization=spec.gpu_memory_utilization,
                                max_length=spec.max_length, batch_tokens=spec.batch_tokens, gpus=gpus)
    if isinstance(job, FuseJob):
        shape = model_shape(job.pivot, bool(job.settings.get("trust_remote_code")))
        if shape is None:
            return None
        return training_estimate(shape, job.settings, sharding_of(job.launch), max_length)
    if isinstance(job, EvalJob):
        shapes = [model_shape(path, path in job.trusted) for _, _, path, _ in job.models]
        known = [s for s in shapes if s is not None]
        if not known:
            return None
        big = max(known, key=lambda s: s.fp32_bytes)
        tokens = job.options.batch_size * job.options.max_length
        return Estimate({"weights": big.fp32_bytes, "logits": tokens * big.vocab * 4 * 2}, 1)
    return None


def check_memory(stages: list[Any], max_length: int, declared: int | None) -> tuple[dict[str, Estimate], list[str]]:
    """Every stage's estimate, and one problem per stage that cannot fit the GPUs (with the
    changes that would make it fit)."""
    budget, where = declared_gpu_memory(declared)
    estimates, problems = {}, []
    for stage in stages:
        estimate = stage_estimate(stage, max_length)
        if estimate is None:
            continue
        estimates[stage.id] = estimate
        if budget is None:
            continue
        allowed = int(budget * estimate.budget_share)
        if estimate.per_device <= allowed:
            continue
        share = f"{estimate.budget_share:.0%} of " if estimate.budget_share < 1 else ""
        line = (f"stage {stage.id} needs about {estimate.describe()}, more than {share}"
                f"{budget / GiB:.0f} GiB per GPU ({where})")
        problems.append(line + ": " + "; or ".join(_fixes(stage, estimate, allowed, max_length)))
    return estimates, problems


def _fixes(stage: Any, estimate: Estimate, allowed: int, max_length: int) -> list[str]:
    from fusechat_merge.pipeline.jobs import FuseJob, LogitsJob

    job = stage.job
    if isinstance(job, FuseJob):
        shape = model_shape(job.pivot, bool(job.settings.get("trust_remote_code")))
        assert shape is not None
        return what_would_fit(shape, job.settings, sharding_of(job.launch), max_length, allowed)
    if isinstance(job, LogitsJob):
        fixes = []
        per_gpu_weights = estimate.parts.get("weights", 0) * estimate.devices
        for tp in (2, 4, 8, 16):
            if per_gpu_weights // tp * 1.15 < allowed and tp > estimate.devices:
                fixes.append(f"tensor_parallel_size: {tp} (backend: vllm) on this model's entry")
                break
        if job.dtype == "float32":
            fixes.append("logits.dtype: bfloat16")
        fixes.append("a lower logits.max_length")
        fixes.append("GPUs with more memory (resources.gpu_memory)")
        return fixes
    return ["GPUs with more memory (resources.gpu_memory)"]
