"""Benchmark ``fusechat_sce`` against mergekit's built-in ``sce`` and ``ties`` and an I/O floor.

Why: the plugin's performance targets are relative, so they can only be judged by
measuring everything side by side in one run on one machine:

* time ≤ 0.8× mergekit ``sce`` at τ = 0.1,
* time within 1.5× of an I/O floor (read every input tensor, write the base tensors),
* peak RSS ≤ mergekit ``sce``'s (same τ).

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_merge.py                 # ~150M-parameter models
    .venv/bin/python benchmarks/bench_merge.py --quick         # ~20M: smoke test, ~2 min
    .venv/bin/python benchmarks/bench_merge.py --params 500M --repeat 3 --threads 4

What it does:

1. Builds locally (nothing is downloaded) a Llama-shaped base model in bfloat16 with a
   large untied embedding and three targets (base + Gaussian noise, different seeds),
   written as ``config.json`` + ``model.safetensors`` under ``--work-dir`` (default
   ``bench-work/``, git-ignored). Tensor names come from transformers' own Llama model
   built on the meta device. Models are reused when their ``spec.json`` matches.
2. Merges them with every method in `whole_model_methods`, each in a fresh
   subprocess: ``python -m fusechat_merge.cli merge`` for ``fusechat_sce``,
   ``mergekit-yaml`` for the built-ins, and this script's ``--floor-only`` mode for the
   I/O floor (``safetensors.safe_open``, one tensor at a time, then ``save_file``).
   A second floor, "I/O floor + imports", does the same after importing what the merge
   CLIs import (``fusechat_merge.cli``, ``mergekit.merge``): on small models the
   interpreter start and imports (seconds) dominate, and no merge CLI can avoid them.
   All children get the same ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and
   ``--num-threads``, and the same mergekit options (``--quiet --no-copy-tokenizer``).
   The input files are read once before timing, so every run sees a warm page cache;
   ``os.sync()`` runs between children so one run's write-back does not slow the next.
3. Prints a table (wall time, the child's CPU time, peak RSS, ratios) and whether each
   target is met, and writes ``bench_merge.json``. The issue's floor target is judged
   against the plain floor; the ratio to the floor with imports is printed beside it.
4. Micro benchmark: `fusechat_merge.sce.sce_merge` against mergekit's
   ``merge_tensors(..., "sce", ...)`` on one 32000×4096 (8192×4096 with ``--quick``)
   bfloat16 base and three targets, one fresh subprocess per case.

How time and memory are measured:

* Whole merges: each command runs under this script's ``--measure`` launcher, a small
  fresh process that starts the command with ``subprocess.Popen``, reaps it with
  ``os.wait4`` and writes that child's wall time, CPU time (user + system) and
  ``ru_maxrss`` (its peak resident set; Linux, KiB) to a JSON file. The launcher exists
  because a child's ``ru_maxrss`` starts at the RSS of the process it was forked from,
  and this process may hold whole models; the launcher holds a few MiB. No
  ``/usr/bin/time`` and no cooperation from the command are needed. Peak RSS includes the
  mmapped safetensors pages a process touched, for every method alike. Wall time
  includes interpreter start and imports (reported separately as "startup").
* Micro cases: inside the child, after the inputs exist, the kernel's peak-RSS mark is
  reset (``echo 5 > /proc/self/clear_refs``); the reported extra memory is ``VmHWM``
  after the merge minus ``VmRSS`` before it, so it includes the output tensor. Where the
  reset is not allowed, the child falls back to ``ru_maxrss`` and says so.

With ``--repeat N`` the methods run round-robin N times; the table shows the smallest
wall time and the largest peak RSS of each. Nothing here asserts absolute times.

Run it on an otherwise idle machine: other runnable processes make every time longer,
and chunked kernels that run many short multi-threaded torch ops (``fusechat_sce``) lose
far more than kernels made of a few large ops, because every op waits for its slowest
thread. The load average at start and end is printed and saved with the results;
``--threads 1`` is the less contention-sensitive setting on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import peak_rss_kib, proc_status_kib, reset_peak_rss

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
N_TARGETS = 3
INIT_STD = 0.02
NOISE_STD = 0.002
MIB = 1 << 20
TIME_TARGET = 0.8  # × mergekit sce at τ = 0.1
FLOOR_TARGET = 1.5  # × I/O floor
FLOOR = "I/O floor"
FLOOR_IMPORTS = "I/O floor + imports"
MERGE_MODULES = ("fusechat_merge.cli", "mergekit.merge")
MERGE_IMPORTS = "import " + ", ".join(MERGE_MODULES)
TAUS = (0.1, 1.0)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a Llama-style model (untied lm_head, grouped-query attention)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int


PRESETS: dict[str, ModelSpec] = {
    "20M": ModelSpec(16000, 512, 1024, 2, 8, 4),
    "150M": ModelSpec(64000, 768, 2048, 9, 12, 4),
    "500M": ModelSpec(64000, 1536, 4096, 12, 12, 4),
}
MICRO_SHAPES: dict[bool, tuple[int, int]] = {False: (32000, 4096), True: (8192, 4096)}


def llama_config(spec: ModelSpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's weights, from transformers' Llama on meta."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def model_dirs(work_dir: Path, params: str) -> list[Path]:
    root = work_dir / f"models-{params}"
    return [root / "base", *(root / f"target{j}" for j in range(1, N_TARGETS + 1))]


def _spec_record(spec: ModelSpec, seed: int) -> dict[str, Any]:
    return {**asdict(spec), "seed": seed, "init_std": INIT_STD, "noise_std": NOISE_STD}


def _is_complete(path: Path, record: dict[str, Any]) -> bool:
    marker = path / "spec.json"
    return marker.exists() and json.loads(marker.read_text()) == record


def _write_model(path: Path, config, tensors: dict, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "spec.json").write_text(json.dumps(record))  # written last: marks completion


def _random_base(shapes: dict[str, tuple[int, ...]], seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # RMSNorm weights
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * INIT_STD).bfloat16()
    return tensors


def _noisy(base: dict, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {
        name: (t.float() + torch.randn(t.shape, generator=gen) * NOISE_STD).bfloat16()
        for name, t in base.items()
    }


def ensure_models(work_dir: Path, params: str, seed: int = 0) -> tuple[list[Path], int]:
    """Build (or reuse) the base and targets; returns their directories and #params."""
    spec = PRESETS[params]
    config = llama_config(spec)
    shapes = tensor_shapes(config)
    numel = sum(math.prod(s) for s in shapes.values())
    dirs = model_dirs(work_dir, params)
    records = [_spec_record(spec, seed + j) for j in range(len(dirs))]
    if all(_is_complete(d, r) for d, r in zip(dirs, records, strict=True)):
        log(f"reusing models in {dirs[0].parent}")
        return dirs, numel
    log(f"building {params} models ({numel / 1e6:.1f}M parameters) in {dirs[0].parent}")
    base = _random_base(shapes, seed)
    _write_model(dirs[0], config, base, records[0])
    for j, (path, record) in enumerate(zip(dirs[1:], records[1:], strict=True), start=1):
        _write_model(path, config, _noisy(base, seed + j), record)
    return dirs, numel


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    key: str
    kind: str  # "fusechat" | "mergekit" | "floor" | "floor+imports"
    tau: float | None = None
    recipe: dict[str, Any] | None = None


def sce_reference(tau: float | None) -> str:
    """Key of the mergekit ``sce`` run compared with (τ = 0.1 for methods without τ)."""
    return f"mergekit sce τ={tau if tau is not None else TAUS[0]}"


def _models_block(dirs: list[Path], per_model: dict[str, Any] | None = None) -> list[dict]:
    entries: list[dict[str, Any]] = [{"model": str(dirs[0])}]
    for d in dirs[1:]:
        entry: dict[str, Any] = {"model": str(d)}
        if per_model:
            entry["parameters"] = dict(per_model)
        entries.append(entry)
    return entries


def _recipe(method: str, dirs: list[Path], parameters: dict, per_model: dict | None = None):
    return {
        "merge_method": method,
        "base_model": str(dirs[0]),
        "models": _models_block(dirs, per_model),
        "parameters": parameters,
        "dtype": "bfloat16",
    }


def whole_model_methods(dirs: list[Path]) -> list[Method]:
    methods = [Method(FLOOR, "floor"), Method(FLOOR_IMPORTS, "floor+imports")]
    for tau in TAUS:
        recipe = _recipe("sce", dirs, {"select_topk": tau})
        methods.append(Method(sce_reference(tau), "mergekit", tau, recipe))
    for scope in ("weights", "deltas"):
        for tau in TAUS:
            params = {"select_topk": tau, "select_scope": scope}
            recipe = _recipe("fusechat_sce", dirs, params)
            methods.append(Method(f"fusechat_sce {scope} τ={tau}", "fusechat", tau, recipe))
    ties = _recipe("ties", dirs, {"normalize": True}, {"density": 0.6, "weight": 0.2})
    methods.append(Method("mergekit ties d=0.6 w=0.2", "mergekit", None, ties))
    return methods


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in key).strip("_")


def prepare_command(method: Method, dirs: list[Path], work_dir: Path, threads: int) -> list[str]:
    out = work_dir / "out" / _slug(method.key)
    if out.exists():
        shutil.rmtree(out)
    if method.kind.startswith("floor"):
        imports = ["--floor-imports"] if method.kind == "floor+imports" else []
        script = str(Path(__file__).resolve())
        return [sys.executable, script, *imports, "--floor-only", str(out), *map(str, dirs)]
    recipe_path = work_dir / "recipes" / f"{_slug(method.key)}.yml"
    write_recipe(recipe_path, method.recipe or {})
    options = ["--quiet", "--no-copy-tokenizer", "--num-threads", str(threads)]
    if method.kind == "fusechat":
        head = [sys.executable, "-m", "fusechat_merge.cli", "merge"]
    else:
        head = [str(BIN_DIR / "mergekit-yaml")]
    return [*head, str(recipe_path), str(out), *options]


def write_recipe(path: Path, recipe: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


# --------------------------------------------------------------------------- running


@dataclass
class Measurement:
    wall_s: float
    cpu_s: float
    """User + system CPU time of the child (threads spinning at a barrier count too)."""
    peak_rss_mib: float
    returncode: int


@dataclass
class Result:
    key: str
    kind: str
    tau: float | None
    runs: list[Measurement] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.returncode == 0 for r in self.runs)

    @property
    def wall_s(self) -> float:
        return min(r.wall_s for r in self.runs)

    @property
    def cpu_s(self) -> float:
        return min(r.cpu_s for r in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return max(r.peak_rss_mib for r in self.runs)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path) -> Measurement:
    """Run ``cmd`` through the ``--measure`` launcher; its wall, CPU time and peak RSS.

    The launcher is a small fresh process, not this one: a child's ``ru_maxrss`` starts
    at the RSS of the process it was forked from, which here may hold whole models.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path = log_path.with_suffix(".measure.json")
    result_path.unlink(missing_ok=True)
    launcher = [sys.executable, str(Path(__file__).resolve()), "--measure", str(result_path)]
    with open(log_path, "w") as log_file:
        subprocess.run(
            [*launcher, *cmd],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
            check=False,
        )
    if not result_path.exists():
        return Measurement(float("nan"), float("nan"), float("nan"), -1)
    return Measurement(**json.loads(result_path.read_text()))


def measure_child(result_path: Path, cmd: Sequence[str]) -> int:
    """The ``--measure`` launcher: run ``cmd``, reap it with ``wait4``, write the numbers."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    result = Measurement(
        wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode
    )
    result_path.write_text(json.dumps(asdict(result)))
    return proc.returncode


def warm_page_cache(dirs: list[Path]) -> None:
    for d in dirs:
        with open(d / "model.safetensors", "rb") as f:
            while f.read(64 * MIB):
                pass


def run_whole_model(
    methods: list[Method], dirs: list[Path], work_dir: Path, threads: int, repeat: int
) -> tuple[list[Result], Measurement]:
    env = child_env(threads)
    warm_page_cache(dirs)
    startup_cmd = [sys.executable, "-c", MERGE_IMPORTS]
    startup = run_measured(startup_cmd, env, work_dir / "logs" / "startup.log")
    results = {m.key: Result(m.key, m.kind, m.tau) for m in methods}
    for round_ in range(1, repeat + 1):
        for method in methods:
            log_path = work_dir / "logs" / f"{_slug(method.key)}.log"
            cmd = prepare_command(method, dirs, work_dir, threads)
            os.sync()
            m = run_measured(cmd, env, log_path)
            results[method.key].runs.append(m)
            status = "ok" if m.returncode == 0 else f"FAILED (exit {m.returncode}, see {log_path})"
            log(
                f"[{round_}/{repeat}] {method.key:<28} {m.wall_s:7.2f} s "
                f"{m.peak_rss_mib:8.0f} MiB  {status}"
            )
            if m.returncode != 0:
                print(_tail(log_path), file=sys.stderr)
    return list(results.values()), startup


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- floor


def floor_only(out_dir: Path, model_paths: Sequence[Path], merge_imports: bool = False) -> None:
    """The I/O floor: read every tensor of every model, write the base tensors.

    With ``merge_imports``, first import what the merge CLIs import.
    """
    if merge_imports:
        for module in MERGE_MODULES:
            importlib.import_module(module)
    from safetensors import safe_open
    from safetensors.torch import save_file

    kept: dict = {}
    for index, path in enumerate(model_paths):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(name)
                if index == 0:
                    kept[name] = tensor
                del tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def table_rows(results: list[Result]) -> list[dict[str, Any]]:
    by_key = {r.key: r for r in results if r.ok}
    floor = by_key.get(FLOOR)
    floor_imports = by_key.get(FLOOR_IMPORTS)
    rows = []
    for r in results:
        ref_key = sce_reference(r.tau)
        ref = by_key.get(ref_key)
        wall = r.wall_s if r.ok else None
        cpu = r.cpu_s if r.ok else None
        rss = r.peak_rss_mib if r.ok else None
        rows.append(
            {
                "method": r.key,
                "tau": r.tau,
                "ok": r.ok,
                "wall_s": wall,
                "cpu_s": cpu,
                "peak_rss_mib": rss,
                "reference": ref_key,
                "time_vs_ref": ratio(wall, ref.wall_s if ref else None),
                "time_vs_floor": ratio(wall, floor.wall_s if floor else None),
                "time_vs_floor_imports": ratio(
                    wall, floor_imports.wall_s if floor_imports else None
                ),
                "cpu_vs_ref": ratio(cpu, ref.cpu_s if ref else None),
                "rss_vs_ref": ratio(rss, ref.peak_rss_mib if ref else None),
                "runs": [asdict(m) for m in r.runs],
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], startup: Measurement) -> None:
    header = (
        f"{'method':<28} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13} {'time/ref':>9} "
        f"{'CPU/ref':>8} {'time/floor':>10} {'t/floor+imp':>11} {'RSS/ref':>8}  ref"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        wall = _fmt(row["wall_s"]) if row["ok"] else "FAILED"
        print(
            f"{row['method']:<28} {wall:>8} {_fmt(row['cpu_s']):>8} "
            f"{_fmt(row['peak_rss_mib'], '.0f'):>13} {_fmt(row['time_vs_ref']):>9} "
            f"{_fmt(row['cpu_vs_ref']):>8} {_fmt(row['time_vs_floor']):>10} "
            f"{_fmt(row['time_vs_floor_imports']):>11} {_fmt(row['rss_vs_ref']):>8}  "
            f"{row['reference']}"
        )
    print(
        f"(ref = the mergekit sce run each row is compared with; startup alone, "
        f"`python -c '{MERGE_IMPORTS}'`: {startup.wall_s:.2f} s wall, {startup.cpu_s:.2f} s CPU, "
        f"{startup.peak_rss_mib:.0f} MiB, included in every merge's numbers)"
    )


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, for every fusechat_sce variant that ran."""
    checks = []
    for row in rows:
        if not row["method"].startswith("fusechat_sce") or not row["ok"]:
            continue
        if row["tau"] == TAUS[0]:
            cpu_note = f"CPU-time ratio {_fmt(row['cpu_vs_ref'])}"
            target = f"time ≤ {TIME_TARGET}× {row['reference']}"
            checks.append(_check(row, target, row["time_vs_ref"], TIME_TARGET, cpu_note))
        imports_note = f"vs floor + imports {_fmt(row['time_vs_floor_imports'])}"
        target = f"time ≤ {FLOOR_TARGET}× {FLOOR}"
        checks.append(_check(row, target, row["time_vs_floor"], FLOOR_TARGET, imports_note))
        target = f"peak RSS ≤ {row['reference']}"
        checks.append(_check(row, target, row["rss_vs_ref"], 1.0))
    return checks


def _check(
    row: dict[str, Any], target: str, value: float | None, limit: float, note: str = ""
) -> dict[str, Any]:
    met = value is not None and value <= limit
    return {
        "method": row["method"],
        "target": target,
        "ratio": value,
        "limit": limit,
        "met": met,
        "note": note,
    }


def print_targets(checks: list[dict[str, Any]]) -> None:
    print("\nTargets (from the issue):")
    for c in checks:
        verdict = "MET" if c["met"] else "NOT MET"
        note = f"  ({c['note']})" if c["note"] else ""
        print(
            f"  {c['method']:<28} {c['target']:<30} ratio {_fmt(c['ratio']):>6}  {verdict:<7}{note}"
        )


# --------------------------------------------------------------------------- micro


@dataclass(frozen=True)
class MicroCase:
    impl: str  # "fusechat" | "mergekit"
    tau: float
    scope: str = "deltas"

    @property
    def label(self) -> str:
        if self.impl == "mergekit":
            return f"mergekit sce τ={self.tau}"
        return f"fusechat {self.scope} τ={self.tau}"


def micro_cases() -> list[MicroCase]:
    cases = []
    for tau in TAUS:
        cases += [MicroCase("mergekit", tau), MicroCase("fusechat", tau, "deltas")]
    cases.append(MicroCase("fusechat", TAUS[0], "weights"))
    return cases


def _micro_inputs(rows: int, cols: int, seed: int = 0):
    """bf16 base and targets, filled in row blocks so the peak RSS stays near the RSS."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    base = torch.empty(rows, cols, dtype=torch.bfloat16)
    targets = [torch.empty_like(base) for _ in range(N_TARGETS)]
    step = max(1, (1 << 22) // cols)
    for r in range(0, rows, step):
        b = torch.randn(min(step, rows - r), cols, generator=gen) * INIT_STD
        base[r : r + step] = b
        for t in targets:
            t[r : r + step] = b + torch.randn(b.shape, generator=gen) * NOISE_STD
    return base, targets


def _micro_fn(case: MicroCase):
    if case.impl == "mergekit":
        from mergekit.merge_methods.api import merge_tensors

        def run(base, targets):
            params = {"select_topk": case.tau}
            return merge_tensors([base, *targets], "sce", parameters=params, base_index=0)

        return run
    from fusechat_merge.sce import sce_merge

    def run(base, targets):
        return sce_merge(base, targets, select_topk=case.tau, select_scope=case.scope)

    return run


def _cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def micro_child(case: MicroCase, rows: int, cols: int, threads: int) -> dict[str, Any]:
    """One micro case in this (fresh) process; returns its measurements."""
    import gc

    import torch

    torch.set_num_threads(threads)
    fn = _micro_fn(case)
    warm = _micro_inputs(256, 256, seed=1)
    fn(*warm)  # first-call overhead (imports, registries) outside the measurement
    del warm
    base, targets = _micro_inputs(rows, cols)
    gc.collect()
    rss_before = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    cpu_before, start = _cpu_s(), time.perf_counter()
    out = fn(base, targets)
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu_before
    return {
        "case": case.label,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_extra_mib": (peak_rss_kib(reset) - rss_before) / 1024,
        "peak_reset": reset,
        "output_mib": out.numel() * out.element_size() / MIB,
    }


def fusechat_scratch_estimate(numel: int, n: int, tau: float) -> int:
    """`scratch_bytes` for the default chunk and budget (the variance cache when it fits)."""
    from fusechat_merge.sce import DEFAULT_CHUNK_ELEMENTS, DEFAULT_MAX_SCRATCH_BYTES, scratch_bytes

    chunk = min(DEFAULT_CHUNK_ELEMENTS, numel)
    cache = tau < 1 and scratch_bytes(numel, n, chunk, True) <= DEFAULT_MAX_SCRATCH_BYTES
    return scratch_bytes(numel, n, chunk, cache)


def run_micro_case(case: MicroCase, rows: int, cols: int, threads: int) -> dict[str, Any] | None:
    """Run one micro case in a fresh subprocess; None (and a log line) when it fails."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--micro-case", case.impl, case.scope]
    cmd += [str(case.tau), "--micro-shape", f"{rows}x{cols}", "--threads", str(threads)]
    env = child_env(threads)
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log(f"micro {case.label} FAILED:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_micro(rows: int, cols: int, threads: int, repeat: int) -> list[dict[str, Any]]:
    """Every case ``repeat`` times, round-robin; smallest time, largest memory kept."""
    cases = micro_cases()
    runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in cases}
    for round_ in range(1, repeat + 1):
        for case in cases:
            os.sync()
            r = run_micro_case(case, rows, cols, threads)
            if r is None:
                continue
            runs[case.label].append(r)
            log(
                f"[{round_}/{repeat}] micro {case.label:<24} {r['wall_s']:7.2f} s "
                f"{r['cpu_s']:7.2f} s CPU  +{r['peak_extra_mib']:.0f} MiB"
            )
    results = []
    for case in cases:
        done = runs[case.label]
        if not done:
            results.append({"case": case.label, "failed": True})
            continue
        result = {
            "case": case.label,
            "wall_s": min(r["wall_s"] for r in done),
            "cpu_s": min(r["cpu_s"] for r in done),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in done),
            "peak_reset": all(r["peak_reset"] for r in done),
            "output_mib": done[0]["output_mib"],
            "runs": done,
        }
        if case.impl == "fusechat":
            estimate = fusechat_scratch_estimate(rows * cols, N_TARGETS, case.tau)
            result["scratch_estimate_mib"] = estimate / MIB
        results.append(result)
    _add_micro_ratios(results)
    return results


def _add_micro_ratios(results: list[dict[str, Any]]) -> None:
    refs = {r["case"]: r for r in results if not r.get("failed")}
    for r in results:
        if r.get("failed"):
            continue
        tau = r["case"].rsplit("τ=", 1)[1]
        ref = refs.get(f"mergekit sce τ={tau}")
        r["reference"] = f"mergekit sce τ={tau}"
        r["time_vs_ref"] = ratio(r["wall_s"], ref["wall_s"] if ref else None)
        r["cpu_vs_ref"] = ratio(r["cpu_s"], ref["cpu_s"] if ref else None)
        r["mem_vs_ref"] = ratio(r["peak_extra_mib"], ref["peak_extra_mib"] if ref else None)


def print_micro(results: list[dict[str, Any]], rows: int, cols: int) -> None:
    print(f"\nMicro benchmark: one {rows}×{cols} bf16 tensor, base + {N_TARGETS} targets")
    header = (
        f"{'case':<24} {'wall s':>8} {'CPU s':>8} {'time/ref':>9} {'CPU/ref':>8} "
        f"{'peak extra MiB':>15} {'mem/ref':>8} {'output MiB':>11} {'scratch est MiB':>16}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.get("failed"):
            print(f"{r['case']:<24} FAILED")
            continue
        print(
            f"{r['case']:<24} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {_fmt(r['time_vs_ref']):>9} "
            f"{_fmt(r['cpu_vs_ref']):>8} {r['peak_extra_mib']:>15.0f} {_fmt(r['mem_vs_ref']):>8} "
            f"{r['output_mib']:>11.0f} {_fmt(r.get('scratch_estimate_mib'), '.0f'):>16}"
        )
    print(
        "(ref = mergekit sce, same τ; peak extra = peak RSS during the call − RSS before it, "
        "output included; scratch est = fusechat_merge.sce.scratch_bytes, output excluded)"
    )
    if not all(r.get("peak_reset", True) for r in results):
        print("(warning: /proc/self/clear_refs not writable; peak extra from ru_maxrss)")


# --------------------------------------------------------------------------- main


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def system_info(threads: int) -> dict[str, Any]:
    import mergekit
    import torch

    version = getattr(mergekit, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("mergekit")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "mergekit": version,
        "loadavg_at_start": os.getloadavg(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench-work")
    p.add_argument("--params", choices=sorted(PRESETS), default="150M", help="model size preset")
    p.add_argument("--quick", action="store_true", help="20M models and an 8192×4096 micro tensor")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads for every child"
    )
    p.add_argument("--repeat", type=int, default=1, help="round-robin repetitions (min time kept)")
    p.add_argument("--skip-micro", action="store_true", help="only the whole-model merges")
    p.add_argument("--skip-merges", action="store_true", help="only the micro benchmark")
    internal = p.add_argument_group("internal (child process modes)")
    internal.add_argument(
        "--measure", nargs="+", metavar="ARG", help="RESULT_JSON COMMAND...: run and measure it"
    )
    internal.add_argument(
        "--floor-only", nargs="+", type=Path, metavar="PATH", help="OUT_DIR MODEL..."
    )
    internal.add_argument(
        "--floor-imports", action="store_true", help="import the merge CLIs first"
    )
    internal.add_argument("--micro-case", nargs=3, metavar=("IMPL", "SCOPE", "TAU"))
    internal.add_argument("--micro-shape", default="8192x4096", help="ROWSxCOLS")
    args = p.parse_args(argv)
    if args.quick:
        args.params = "20M"
    return args


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"system": system_info(args.threads), "params": args.params}
    if not args.skip_merges:
        dirs, numel = ensure_models(work_dir, args.params)
        report["model"] = {**asdict(PRESETS[args.params]), "parameters": numel, "dtype": "bfloat16"}
        methods = whole_model_methods(dirs)
        results, startup = run_whole_model(methods, dirs, work_dir, args.threads, args.repeat)
        rows = table_rows(results)
        print(
            f"\nWhole-model merges: {args.params} preset ({numel / 1e6:.1f}M parameters, bf16), "
            f"base + {N_TARGETS} targets, {args.threads} threads, repeat {args.repeat}"
        )
        print_table(rows, startup)
        checks = evaluate_targets(rows)
        print_targets(checks)
        report.update(merges=rows, startup=asdict(startup), targets=checks)
    if not args.skip_micro:
        rows_, cols = MICRO_SHAPES[args.quick]
        report["micro"] = run_micro(rows_, cols, args.threads, args.repeat)
        report["micro_shape"] = [rows_, cols]
        print_micro(report["micro"], rows_, cols)
    report["loadavg_at_end"] = os.getloadavg()
    print(
        f"\nload average (1 min) at start {report['system']['loadavg_at_start'][0]:.2f}, "
        f"at end {report['loadavg_at_end'][0]:.2f} on {os.cpu_count()} CPUs "
        "(other load inflates times; compare only numbers from one run)"
    )
    out = work_dir / "bench_merge.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"\nresults: {out}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--measure"]:  # before argparse: the command's own options follow
        if len(argv) < 3:
            raise SystemExit("--measure needs RESULT_JSON and a command")
        return measure_child(Path(argv[1]), argv[2:])
    args = parse_args(argv)
    if args.floor_only:
        if len(args.floor_only) < 2:
            raise SystemExit("--floor-only needs OUT_DIR and at least one model directory")
        floor_only(args.floor_only[0], args.floor_only[1:], args.floor_imports)
        return 0
    if args.micro_case:
        impl, scope, tau = args.micro_case
        rows, cols = (int(x) for x in args.micro_shape.split("x"))
        case = MicroCase(impl, float(tau), scope)
        print(json.dumps(micro_child(case, rows, cols, args.threads)))
        return 0
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
