"""The package works as installed from its wheel, outside the repository: the demo's recipe is
package data, and the commands run from the installed copy."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a folder."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("fusechat_merge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fusechat_merge/demo/demo-pipeline.yaml" in names
    assert "fusechat_merge_hook.pth" in names
    site = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_copy_is_the_one_that_runs(installed, tmp_path):
    done = run_installed(installed, tmp_path, "-c", "import fusechat_merge.demo.pipeline_demo as d; "
                         "print(d.__file__); print(d.DEMO_RECIPE.is_file())")
    assert done.returncode == 0, done.stderr
    where, found = done.stdout.split()
    assert where.startswith(str(installed)) and found == "True"


def test_the_shipped_demo_recipe_validates(installed, tmp_path):
    code = ("import yaml; from fusechat_merge.demo.pipeline_demo import DEMO_RECIPE; "
            "from fusechat_merge.pipeline_recipe import PipelineRecipe; "
            "r = PipelineRecipe.model_validate(yaml.safe_load(DEMO_RECIPE.read_text())); print(len(r.merges))")
    done = run_installed(installed, tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 6


def test_demo_merge_only_runs_outside_the_repository(installed, tmp_path):
    done = run_installed(installed, tmp_path, "-m", "fusechat_merge.cli", "demo", "--merge-only",
                         "--work-dir", "w")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "w" / "merged" / "config.json").is_file()
    assert (tmp_path / "w" / "report" / "sce_report.csv").is_file()


FIXED_TMP_ALLOWED = {
    ("benchmarks/gpu_check.py", "/tmp/fusechat-gpu-check"): "the --work default of a GPU check a person runs "
                                                           "by hand, meant to be read after",
    ("benchmarks/gpu_check.py", "/tmp/gpu-check"): "an example command in the docstring",
    ("tests/test_mergekit_options.py", "/tmp/hf"): "an option value that is parsed, never written to",
    ("tests/test_mergekit_options.py", "/tmp/lora"): "an option value that is parsed, never written to",
}


def test_no_code_writes_a_fixed_path_under_tmp():
    """A fixed ``/tmp/NAME`` is shared by every run and every user of the machine: another
    user's leftover folder makes it unwritable (the memory benchmark failed that way when
    the suite ran as a non-root user), and two runs at once overwrite each other. Every
    scratch folder comes from `tempfile` or pytest's ``tmp_path``."""
    import ast

    found = set()
    for folder in ("fusechat_merge", "fusion", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == Path(__file__):  # this list itself
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    for word in node.value.split():
                        if word.startswith("/tmp/"):
                            found.add((str(path.relative_to(ROOT)), word.rstrip(".,;:)'\"")))
    assert found - set(FIXED_TMP_ALLOWED) == set()
