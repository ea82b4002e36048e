"""What the benchmarks share: toy reply texts, chat corpora and tiny models, made locally.

The benchmarks run as scripts (``python benchmarks/bench_X.py``), so Python puts this
folder on ``sys.path`` and they import it as ``common``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SENTENCES: tuple[str, ...] = (
    "Knowledge fusion distils several chat models into one compact pivot model.",
    "The capital of France is Paris; 12 * 12 = 144 and 2 + 2 = 4.",
    "Model merging combines the weights of several fine-tuned models!",
    "Bonjour le monde, naïve café — ÄÖÜ ß é 😀 (a+b).",
    "def add(a, b):\n    return a + b",
)


def reply(i: int, words: int, sentences: Sequence[str] = SENTENCES) -> str:
    """An assistant reply of at least ``words`` words, varied by ``i``: every third
    sentence of ``sentences``, cycling, from sentence ``i``."""
    out: list[str] = []
    j = i
    while sum(len(s.split()) for s in out) < words:
        out.append(sentences[j % len(sentences)])
        j += 3
    return " ".join(out)


def write_chats(path: Path, exchanges: Iterable[tuple[str, str]]) -> Path:
    """A JSONL corpus of one-exchange conversations (ids ``c0``, ``c1``, ...) at ``path``."""
    from fusion.artifacts.atomic import write_jsonl_atomic

    rows = (
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
        }
        for i, (question, answer) in enumerate(exchanges)
    )
    return write_jsonl_atomic(path, rows)


def toy_model(path: Path, tokenizer_kind: str, arch: str, **settings: Any) -> Path:
    """A random ``arch`` model with the toy tokenizer ``tokenizer_kind`` at ``path``
    (`fusechat_merge.demo.toy.make_model` with ``settings``); one already there is reused."""
    from fusechat_merge.demo.toy import make_model, make_tokenizer

    if (path / "config.json").exists():
        return path
    return make_model(path, arch, tokenizer=make_tokenizer(tokenizer_kind), **settings)


def proc_status_kib(field_name: str) -> int:
    """A KiB field of /proc/self/status (Linux): ``VmRSS`` now, ``VmHWM`` its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its RSS now; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_kib(reset: bool) -> int:
    """The peak RSS since `reset_peak_rss` (``reset`` True), else since the process started."""
    import resource

    return proc_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- the demo sweeps (sweep_lm_weight.py, sweep_pick.py) ---------------------------------


def plus_minus(cell: dict[str, Any] | None, digits: int = 3, sign: bool = True) -> str:
    """A report cell (``{"mean": ..., "std": ...}``) as ``+0.123 ± 0.045``; ``-`` when empty."""
    if not cell or cell.get("mean") is None:
        return "-"
    return f"{cell['mean']:{'+' if sign else ''}.{digits}f} ± {cell['std']:.{digits}f}"


def demo_on_validation(run_dir: Path, recipe: dict[str, Any], recipe_file: Path) -> dict[str, Any]:
    """Run the demo pipeline with ``recipe`` (written to ``recipe_file``) in ``run_dir``,
    whose models and data are already there, scored on the validation split (where the
    demo's settings are chosen); returns its ``results.json``."""
    import json

    import yaml

    from fusechat_merge.demo.pipeline_demo import run_pipeline_demo

    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    run_pipeline_demo(run_dir, recipe=recipe_file, split="validation", echo=lambda _: None)
    return json.loads((run_dir / "report" / "results.json").read_text(encoding="utf-8"))

