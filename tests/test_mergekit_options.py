"""The static copy of mergekit-yaml's options (`fusechat_merge.mergekit_options`).

The options are a generated table (`fusechat_merge._mergekit_option_table`, written by
``tools/gen_mergekit_options.py``) read by the hand-written module. The table must be what
the generator writes for the installed mergekit; the options must not drift from what
mergekit's ``add_merge_options`` generates (options, spellings, types, defaults, help),
must build the same ``MergeOptions`` from the same command line, and must not import
mergekit or torch until a command runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from fusechat_merge import mergekit_options as static

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "gen_mergekit_options.py"
TABLE = ROOT / "fusechat_merge" / "_mergekit_option_table.py"
HEAVY = ("torch", "transformers", "peft", "mergekit", "datasets", "pyarrow")

pytestmark = pytest.mark.filterwarnings("ignore")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_mergekit_options", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(extra_option: bool = False):
    """A command decorated with mergekit's decorator and one with the static copy.

    Each records what its function receives in ``.calls``.
    """
    from mergekit.options import add_merge_options

    made = []
    for decorator in (add_merge_options, static.add_mergekit_options):
        calls: list[dict] = []

        def body(calls=calls, **kwargs):
            calls.append(kwargs)

        if extra_option:
            body = click.option("--report", default=None)(decorator(body))
            body = click.argument("recipe")(body)
        else:
            body = decorator(body)
        command = click.command("dummy")(body)
        command.calls = calls
        made.append(command)
    return made


def _option_record(param: click.Parameter) -> dict:
    """Everything click keeps about an option, types by their info dict."""
    record = {k: v for k, v in vars(param).items() if k not in ("type", "callback")}
    record["type"] = (param.type.name, param.type.to_info_dict())
    record["info"] = param.to_info_dict()
    record["callback"] = param.callback
    return record


def test_generated_table_is_up_to_date():
    generator = _generator()
    assert generator.TARGET == TABLE
    current = TABLE.read_text(encoding="utf-8")
    assert current == generator.render(), "stale: run `python tools/gen_mergekit_options.py`"


def test_table_rows_are_the_fields_of_mergekit_option():
    assert static.MergekitOption._fields == _generator().FIELDS
    assert all(type(o) is static.MergekitOption for o in static.MERGEKIT_OPTIONS)
    assert len(static.MERGEKIT_OPTIONS) == len(static.OPTION_NAMES)


def test_generator_writes_and_checks(tmp_path, capsys):
    generator = _generator()
    out = tmp_path / "table.py"
    assert generator.main(["--check", "--out", str(out)]) == 1
    assert generator.main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == TABLE.read_text(encoding="utf-8")
    assert generator.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    assert generator.main(["--check", "--out", str(out)]) == 1
    capsys.readouterr()


def test_options_match_mergekits():
    import mergekit
    from mergekit.options import OPTION_CATEGORIES, OPTION_HELP, MergeOptions

    theirs, ours = _commands()
    assert [p.name for p in ours.params] == [p.name for p in theirs.params]
    assert [p.name for p in ours.params] == list(MergeOptions.model_fields)
    assert set(MergeOptions.model_fields) == static.OPTION_NAMES
    for mine, real in zip(ours.params, theirs.params, strict=True):
        assert _option_record(mine) == _option_record(real), mine.name
    for option in static.MERGEKIT_OPTIONS:
        assert option.help == OPTION_HELP.get(option.name)
        assert option.category == OPTION_CATEGORIES.get(option.name)
    from importlib.metadata import version

    assert version("mergekit") == static.MERGEKIT_VERSION, mergekit.__file__


def test_spellings_are_mergekits():
    """A readable spot check of the table itself (the full check is above)."""
    by_name = {o.name: o for o in static.MERGEKIT_OPTIONS}
    assert by_name["cuda"].decls == ("cuda", "--cuda/--no-cuda")
    assert by_name["verbosity"].opts == ("-v",) and by_name["verbosity"].count
    assert by_name["num_threads"].opts == ("--num-threads", "-j")
    assert by_name["gpu_rich"].opts == ("--gpu-rich",) and not by_name["gpu_rich"].secondary_opts
    assert by_name["out_shard_size"].type == "size"
    assert by_name["out_shard_size"].default == 5_000_000_000


def test_help_text_is_mergekits():
    theirs, ours = _commands(extra_option=True)
    with click.Context(theirs) as ctx_t, click.Context(ours) as ctx_o:
        assert ours.get_help(ctx_o) == theirs.get_help(ctx_t)


ARGUMENTS = [
    [],
    ["--cuda"],
    ["--no-cuda"],
    ["--lazy-unpickle"],
    ["--no-lazy-unpickle"],
    ["--random-seed", "3"],
    ["--out-shard-size", "1B"],
    ["--out-shard-size", "500k", "--allow-crimes", "--quiet"],
    ["--out-shard-size", "123456"],
    ["-vv", "-j", "4"],
    ["--num-threads", "2", "--write-threads", "3", "--async-write"],
    ["--gpu-rich"],
    ["--device", "cuda:1", "--no-copy-tokenizer", "--no-write-model-card"],
    ["--device", "auto"],
    ["--transformers-cache", "/tmp/hf", "--lora-merge-cache", "/tmp/lora", "--lora-merge-dtype", "bfloat16"],
    ["--trust-remote-code", "--clone-tensors", "--low-cpu-memory", "--read-to-gpu", "--multi-gpu"],
    ["--no-safe-serialization", "--unsafe-truncate-embeddings"],
]


@pytest.mark.parametrize("args", ARGUMENTS, ids=lambda a: " ".join(a) or "defaults")
def test_same_merge_options(args):
    theirs, ours = _commands(extra_option=True)
    argv = ["recipe.yml", *args, "--report", "out"]
    theirs.main(argv, standalone_mode=False)
    ours.main(argv, standalone_mode=False)
    (got_t,), (got_o,) = theirs.calls, ours.calls
    assert set(got_o) == set(got_t) == {"merge_options", "recipe", "report"}
    assert got_o["merge_options"] == got_t["merge_options"]
    assert type(got_o["merge_options"]) is type(got_t["merge_options"])
    assert (got_o["recipe"], got_o["report"]) == (got_t["recipe"], got_t["report"]) == ("recipe.yml", "out")


@pytest.mark.parametrize(
    "args",
    [
        ["--random-seed", "x"],
        ["--out-shard-size", "1.5B"],
        ["--out-shard-size", "12q"],
        ["--num-threads"],
        ["--frobnicate"],
        ["--cuda=yes"],
    ],
)
def test_same_errors(args):
    theirs, ours = _commands()
    outcomes = []
    for command in (theirs, ours):
        try:
            command.main(args, standalone_mode=False)
        except Exception as err:
            outcomes.append((type(err), str(err)))
        else:
            outcomes.append(None)
    assert outcomes[0] is not None
    assert outcomes[1] == outcomes[0]


@pytest.mark.parametrize("value", ["0", "7", "5B", "5b", "20m", "3K", "-2k", "", "x", "1.5m", 42])
def test_shard_size_parses_as_mergekit(value):
    from mergekit.common import parse_kmb

    def outcome(fn):
        try:
            return fn(value)
        except Exception as err:
            return type(err)

    assert outcome(lambda v: static.ShardSize().convert(v, None, None)) == outcome(parse_kmb)


def test_to_merge_options_pops_only_mergekit_fields():
    kwargs = {"cuda": True, "random_seed": 3, "recipe": "r.yml", "out_dir": "o"}
    options = static.to_merge_options(kwargs)
    assert kwargs == {"recipe": "r.yml", "out_dir": "o"}
    assert options.cuda and options.random_seed == 3 and options.device == "cuda"


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def test_import_and_help_stay_light():
    """Importing the module and printing a decorated command's --help import no mergekit."""
    code = f"""
import json, sys
import click
from fusechat_merge.mergekit_options import add_mergekit_options
@click.command()
@add_mergekit_options
def cmd(merge_options):
    pass
cmd.main(["--help"], standalone_mode=False)
print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))
"""
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert "--out-shard-size SIZE" in done.stdout
    assert json.loads(done.stdout.splitlines()[-1]) == []
