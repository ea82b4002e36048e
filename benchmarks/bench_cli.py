"""Benchmark how fast ``fusechat-merge --help`` starts, against a bare Python.

Why: the issue "A command line that starts at once" sets a relative target: ``--help`` of
the group and of every subcommand within 8x the wall time of a bare interpreter that
imports what any click + YAML + pydantic CLI needs (``python -c "import click, yaml,
pydantic"``). A relative target can only be judged side by side in one run on one machine.

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_cli.py              # best of 5
    .venv/bin/python benchmarks/bench_cli.py --repeat 9 --json bench_cli.json

What it does:

1. Lists the subcommands from the click group (``fusechat_merge.cli.main.commands``) in a
   child process, so this process stays light.
2. Times, each in a fresh subprocess, the baseline, ``python -m fusechat_merge.cli --help``
   and ``python -m fusechat_merge.cli <cmd> --help`` for every subcommand: ``--repeat``
   rounds, the cases interleaved within each round (so a slow spell of the machine hits
   them all alike), keeping each case's best wall time. Children run with this checkout
   first on ``PYTHONPATH``.
3. For each ``--help``, a child imports the CLI, runs ``main([..., "--help"],
   standalone_mode=False)`` and reports which heavy modules (torch, transformers,
   mergekit, datasets, pyarrow, numpy) are then in ``sys.modules``.
4. Prints a table: seconds, ratio to the baseline, whether the 8x target is met, and the
   heavy modules imported. Always exits 0: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "mergekit", "datasets", "pyarrow", "numpy")
TARGET = 8.0
BASELINE = "import click, yaml, pydantic"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def run_child(argv: list[str], timeout: float = 300) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(
        argv, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=timeout
    )
    return time.perf_counter() - start, done


def subcommands() -> list[str]:
    code = "import json\nfrom fusechat_merge.cli import main\nprint(json.dumps(sorted(main.commands)))"
    _, done = run_child([sys.executable, "-c", code])
    if done.returncode != 0:
        raise SystemExit(f"cannot list the subcommands:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def heavy_imports(args: list[str]) -> list[str] | str:
    """The heavy modules in sys.modules after ``main([*args, "--help"])``."""
    code = f"""
import contextlib, io, json, sys
from fusechat_merge.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({[*args, "--help"]!r}, standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))
"""
    _, done = run_child([sys.executable, "-c", code])
    if done.returncode != 0:
        return f"error: {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best is kept (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    commands = subcommands()
    cases: dict[str, list[str]] = {"baseline: python -c " + repr(BASELINE): [sys.executable, "-c", BASELINE]}
    cases["fusechat-merge --help"] = [sys.executable, "-m", "fusechat_merge.cli", "--help"]
    for name in commands:
        cases[f"fusechat-merge {name} --help"] = [
            sys.executable, "-m", "fusechat_merge.cli", name, "--help",
        ]

    best: dict[str, float] = dict.fromkeys(cases, float("inf"))
    failed: dict[str, str] = {}
    for _ in range(args.repeat):
        for label, command in cases.items():
            seconds, done = run_child(command)
            if done.returncode != 0:
                failed[label] = (done.stderr.strip().splitlines() or ["?"])[-1]
            best[label] = min(best[label], seconds)

    heavy: dict[str, list[str] | str] = {}
    labels = list(cases)
    heavy[labels[1]] = heavy_imports([])
    for label, name in zip(labels[2:], commands, strict=True):
        heavy[label] = heavy_imports([name])

    base = best[labels[0]]
    width = max(len(label) for label in labels)
    print(f"best of {args.repeat}, fresh subprocess each, interleaved; python {sys.version.split()[0]}")
    print(f"{'case':<{width}}  {'seconds':>8}  {'ratio':>7}  {'<= 8x':>5}  heavy modules imported")
    rows = []
    for label in labels:
        ratio = best[label] / base
        ok = "" if label == labels[0] else ("yes" if ratio <= TARGET else "NO")
        mods = heavy.get(label, "")
        mods_text = mods if isinstance(mods, str) else (", ".join(mods) or "none")
        if label in failed:
            mods_text = f"exit != 0: {failed[label]}"
        print(f"{label:<{width}}  {best[label]:>8.3f}  {ratio:>6.1f}x  {ok:>5}  {mods_text}")
        rows.append({"case": label, "seconds": best[label], "ratio": ratio, "heavy": mods,
                     "failed": failed.get(label)})
    met = all(r["ratio"] <= TARGET for r in rows[1:])
    print(f"target: every --help within {TARGET:g}x the baseline ({TARGET * base:.3f} s): "
          f"{'met' if met else 'not met'}")
    if args.json:
        args.json.write_text(json.dumps({"repeat": args.repeat, "target": TARGET, "rows": rows},
                                        indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as err:  # a benchmark: report, never fail the caller
        print(f"bench_cli: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(0)
