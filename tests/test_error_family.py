"""One error family, mapped to exit codes in one place (issue 25, item 3).

Every command is run with a bad input through the command line (exceptions not caught by
the test runner: a traceback would fail the test): it exits with the family's code, its
message on stderr names what is at fault (the file, the line, the YAML key, the model) and
no traceback is printed. Then every exception class the project defines is checked to be a
`fusion.errors.FusionError`, unless listed below with the reason it never reaches a user.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import sce_recipe, tree_hash, write_recipe

import fusechat_merge
import fusion
from fusechat_merge.cli import main
from fusechat_merge.exit_codes import user_error
from fusion.errors import FusionError, InputError, UsageError

NOT_USER_FACING = {
    "fusion.runtime.stopping.Stopped": "a stop on SIGTERM/Ctrl-C, not an error: exits 128 + the signal "
                                       "(fusechat_merge.console.stopping_cleanly)",
    "fusechat_merge.recipe_keys.DuplicateKeyError": "a PyYAML error; whoever reads the file names it "
                                                    "(RecipeError, PipelineRecipeError)",
    "fusechat_merge.exit_codes.UserFacing": "the click exception a FusionError leaves the command line as",
}


def invoke(*args) -> tuple[int, str]:
    """(exit code, stderr) of the command, with no exception caught: a bug would raise here."""
    result = CliRunner(catch_exceptions=False).invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr


def assert_named(code: int, stderr: str, *words: str, exit_code: int = 1) -> None:
    assert code == exit_code, (code, stderr)
    assert stderr.startswith("Error: ") and "Traceback" not in stderr, stderr
    for word in words:
        assert word in stderr, (word, stderr)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "chats.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n{"id": "b", "conversations": [\n', encoding="utf-8")
    return path


def test_logits_names_the_file_and_line_of_bad_data(world, bad_data, tmp_path):
    code, err = invoke("logits", "--model", world["pivot"], "--data", bad_data, "--out", tmp_path / "s")
    assert_named(code, err, f"{bad_data}, line 2", "invalid JSON")


def test_logits_names_a_model_that_is_not_there(world, tmp_path):
    code, err = invoke("logits", "--model", tmp_path / "nope", "--data", world["data"], "--out", tmp_path / "s")
    assert_named(code, err, f"model path {tmp_path / 'nope'} does not exist")


def test_logits_names_an_option_out_of_range(world, tmp_path):
    code, err = invoke("logits", "--model", world["pivot"], "--data", world["data"], "--out", tmp_path / "s",
                       "--shard", "3/2")
    assert_named(code, err, "--shard 3/2")


def test_align_names_the_store_that_is_not_there(world, tmp_path):
    code, err = invoke("align", "--pivot", world["stores"]["pivot"], "--source", tmp_path / "gone",
                       "--out", tmp_path / "a")
    assert_named(code, err, str(tmp_path / "gone"))


def test_fuse_names_a_config_file_that_is_not_yaml(world, tmp_path):
    config = tmp_path / "fuse.yaml"
    config.write_text("lm_weight: [0.9\n", encoding="utf-8")
    code, err = invoke("fuse", "--pivot", world["pivot"], "--aligned", world["aligned"], "--out", tmp_path / "t",
                       "--config", config)
    assert_named(code, err, str(config), "<yaml>:")


BAD_YAML_FILES = {
    "does not parse": (b"merge_method: [linear\n", "<yaml>: while parsing"),
    "gives a key twice": (b"dtype: float32\ndtype: bfloat16\n", "<yaml>: key 'dtype' is given twice"),
    "is a list": (b"- 1\n- 2\n", "<top level>: "),
    "is not UTF-8": (b"dtype: \xff\xfe\n", "<file>: cannot be read: "),
}


@pytest.mark.parametrize("fault", sorted(BAD_YAML_FILES))
def test_every_command_that_reads_a_yaml_file_words_its_fault_alike(world, tmp_path, fault):
    """`merge`'s recipe, `run`'s recipe and `fuse --config` are read by one reader: the same
    fault reads the same (the file's kind aside), names the file, and is never a traceback."""
    content, said = BAD_YAML_FILES[fault]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    problems = {}
    for command in (("merge", path, tmp_path / "out"), ("run", path, "--work-dir", tmp_path / "w"),
                    ("fuse", "--pivot", world["pivot"], "--aligned", world["aligned"], "--out", tmp_path / "t",
                     "--config", path)):
        code, err = invoke(*command)
        assert_named(code, err, str(path), said)
        problems[command[0]] = err[err.index(said):].splitlines()[0]
    assert problems["fuse"] == problems["merge"].replace("a recipe", "a training config"), problems
    assert problems["run"] == problems["merge"], problems
    assert not (tmp_path / "out").exists() and not (tmp_path / "t").exists()


def test_an_empty_recipe_is_refused_and_an_empty_training_config_is_no_options(tmp_path):
    from fusechat_merge.recipe_keys import RecipeFileError, read_recipe_file

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    for command in (("merge", empty, tmp_path / "out"), ("run", empty, "--work-dir", tmp_path / "w")):
        code, err = invoke(*command)
        assert_named(code, err, str(empty), "<top level>: a recipe is a YAML mapping (key: value lines), "
                                            "not an empty file")
    assert read_recipe_file(empty, empty_ok=True) == ({}, "# nothing yet\n")
    with pytest.raises(RecipeFileError, match="<file>: cannot be read: No such file or directory") as caught:
        read_recipe_file(tmp_path / "absent.yaml")
    assert caught.value.at == {"file": str(tmp_path / "absent.yaml")}


def test_fuse_names_an_unknown_training_key(world, tmp_path):
    config = write_recipe(tmp_path / "fuse.yaml", {"max_stepz": 3})
    code, err = invoke("fuse", "--pivot", world["pivot"], "--aligned", world["aligned"], "--out", tmp_path / "t",
                       "--config", config)
    assert_named(code, err, str(config), "max_stepz")


def test_merge_names_the_recipe_key(model_family, tmp_path):
    recipe = sce_recipe(model_family["llama"][:3])
    recipe["merge_methd"] = recipe.pop("merge_method")
    path = write_recipe(tmp_path / "merge.yaml", recipe)
    code, err = invoke("merge", path, tmp_path / "out")
    assert_named(code, err, str(path), "merge_methd", "unknown key")
    assert not (tmp_path / "out").exists()


def test_merge_names_a_recipe_that_is_not_yaml(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("models: [\n", encoding="utf-8")
    code, err = invoke("merge", path, tmp_path / "out", "--check-only")
    assert_named(code, err, str(path))


def test_logits_merge_names_the_part_that_is_not_there(world, tmp_path):
    code, err = invoke("logits-merge", world["stores"]["pivot"], tmp_path / "nowhere", "--out", tmp_path / "m")
    assert_named(code, err, "nowhere does not exist")


def test_eval_names_the_model(tmp_path):
    pytest.importorskip("lm_eval")
    code, err = invoke("eval", "--model", tmp_path / "nope", "--tasks", "x", "--out", tmp_path / "r.json")
    assert_named(code, err, f"model path {tmp_path / 'nope'} does not exist")


@pytest.mark.parametrize("mode", [[], ["--dry-run"], ["--plan"]])
def test_run_names_the_recipe_key_and_line(world, tmp_path, mode):
    recipe = write_recipe(tmp_path / "p.yaml", {
        "name": "bad", "seeds": [0], "pivot": {"name": "pivot", "model": str(world["pivot"])},
        "sources": [{"name": "src", "model": str(world["source"])}], "data": {"train": str(world["data"])},
        "logits": {"top_kk": 4}})
    code, err = invoke("run", recipe, "--work-dir", tmp_path / "work", *mode)
    assert_named(code, err, str(recipe), "logits.top_kk (line")


def test_run_stage_names_the_stage(world, tmp_path):
    recipe = write_recipe(tmp_path / "p.yaml", {
        "name": "st", "seeds": [0], "pivot": {"name": "pivot", "model": str(world["pivot"])},
        "sources": [{"name": "src", "model": str(world["source"])}], "data": {"train": str(world["data"])}})
    code, err = invoke("run", recipe, "--work-dir", tmp_path / "work", "--stage", "logits/nobody")
    assert_named(code, err, "no stage 'logits/nobody'")


def test_status_names_the_folder_that_is_no_work_dir(tmp_path):
    code, err = invoke("status", tmp_path)
    assert_named(code, err, f"{tmp_path.absolute()} is not a work dir")


@pytest.mark.parametrize("merge_only", [[], ["--merge-only"]])
def test_demo_names_the_folder_it_cannot_write(read_only, merge_only):
    code, err = invoke("demo", "--work-dir", read_only / "fusechat-demo", *merge_only)
    assert_named(code, err, str(read_only / "fusechat-demo"), "the filesystem refused")


def test_usage_errors_are_clicks(tmp_path):
    """click's own usage errors keep click's form: the usage line, exit 2."""
    code, err = invoke("run", tmp_path / "nope.yaml", "--work-dir", tmp_path)
    assert code == 2 and "Usage:" in err and "Traceback" not in err


def test_refused_inputs_are_left_as_they_were(world, bad_data, tmp_path):
    before = tree_hash(world["root"])
    invoke("logits", "--model", world["pivot"], "--data", bad_data, "--out", world["root"] / "s-pivot" / "x")
    assert tree_hash(world["root"]) == before


# --- the mapping ---------------------------------------------------------------------------


def test_third_party_errors_are_translated_and_bugs_are_not():
    try:
        yaml.safe_load("a: [")
    except yaml.YAMLError as err:
        translated = user_error(err)
    assert isinstance(translated, InputError) and "not valid YAML" in str(translated)
    full = OSError(28, "No space left on device", "/data/out/shard-0.arrow")
    translated = user_error(full)
    assert translated is not None and "/data/out/shard-0.arrow" in str(translated)
    assert translated.at["file"] == "/data/out/shard-0.arrow"
    assert user_error(KeyError("x")) is None and user_error(ValueError("bad")) is None  # bugs: a traceback
    assert user_error(FileNotFoundError(2, "No such file", "/x")) is None


def test_an_error_carries_what_is_at_fault_across_processes():
    err = InputError("row 3: bad", file="a.jsonl", row=3)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is InputError and str(again) == "row 3: bad" and again.at == {"file": "a.jsonl", "row": 3}
    assert isinstance(again, ValueError) and again.exit_code == 1 and UsageError("x").exit_code == 2


def test_store_error_pickles_with_its_reason():
    from fusion.artifacts.records import StoreError

    err = pickle.loads(pickle.dumps(StoreError("a reason", "a remedy", file="s")))
    assert (err.reason, err.remedy, str(err), err.at) == ("a reason", "a remedy", "a reason; a remedy", {"file": "s"})


# --- every exception class is one of the family ---------------------------------------------


def project_exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in (fusion, fusechat_merge):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                module = importlib.import_module(info.name)
            except ImportError as err:  # an optional extra (vllm): its module is read as text
                if info.name in ("fusechat_merge._hook",) or "vllm" in str(err) or "ray" in str(err):
                    continue
                raise
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__ == info.name:
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_every_exception_class_is_a_fusion_error():
    classes = project_exception_classes()
    assert "fusion.artifacts.records.StoreError" in classes and "fusechat_merge.sce.SCEInputError" in classes
    outside = sorted(name for name, cls in classes.items()
                     if not issubclass(cls, FusionError) and name not in NOT_USER_FACING)
    assert not outside, f"exception classes outside the family (subclass FusionError, or allow-list them): {outside}"
    assert set(NOT_USER_FACING) <= set(classes), "an allow-listed class is gone: drop it from the list"


def test_no_library_error_is_a_click_exception():
    import click

    classes = project_exception_classes()
    clicky = sorted(name for name, cls in classes.items()
                    if issubclass(cls, click.ClickException) and name != "fusechat_merge.exit_codes.UserFacing")
    assert not clicky, clicky


def test_causes_walks_the_chain_once():
    from fusion.errors import causes

    inner = OSError(28, "No space left on device")
    outer = RuntimeError("safetensors failed")
    outer.__cause__ = inner
    inner.__context__ = outer  # a cycle, as a re-raise in an except block can make
    assert list(causes(outer)) == [outer, inner]
    full = RuntimeError("wrapped")
    full.__context__ = outer
    assert "No space left on device" in str(user_error(full))  # under a library's own error
