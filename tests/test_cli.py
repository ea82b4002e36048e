"""The command line: every command answers --help, options come from the stage dataclasses."""

from __future__ import annotations

import sys

import click
import pytest
from click.testing import CliRunner
from helpers import run

from fusechat_merge.cli import main as cli
from fusion.options import AlignOptions, FusionSettings, LogitOptions, bounds, option_fields

COMMANDS = sorted(cli.commands)


def test_every_command_is_listed():
    assert {"merge", "logits", "logits-merge", "align", "fuse", "run", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("args", [[], *([c] for c in COMMANDS)], ids=lambda a: " ".join(a) or "group")
def test_help_of_every_command(args):
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, result.output
    command = cli if not args else cli.commands[args[0]]
    assert result.output.startswith("Usage:")
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.opts[0] in result.output, param.opts  # every option is documented


FUSE_ALIASES = {"lm_weight": ["--lambda"], "fuse_temperature": ["--temperature"], "fuse_loss_type": ["--loss-type"]}


@pytest.mark.parametrize(("command", "cls", "aliases"),
                         [("logits", LogitOptions, {}), ("align", AlignOptions, {}), ("fuse", FusionSettings, FUSE_ALIASES)])
def test_stage_options_are_generated_from_their_dataclass(command, cls, aliases):
    """Names, help, choices and ranges come from the dataclass; fuse's flags keep their
    short names and default to "not given" (they override --config only when given)."""
    params = {p.name: p for p in cli.commands[command].params}
    overrides = command == "fuse"
    for f in option_fields(cls):
        param = params[f.name]
        assert param.opts == [*aliases.get(f.name, []), "--" + f.name.replace("_", "-")]
        assert param.default == (None if overrides else f.default) and param.help == f.metadata["help"]
        if overrides:
            assert param.show_default == str(f.default)
        if "choices" in f.metadata:
            assert tuple(param.type.choices) == f.metadata["choices"]
        limits = bounds(f)
        for key in ("min", "max", "min_open"):
            if limits[key] not in (None, False):
                assert getattr(param.type, key) == limits[key], (f.name, key)


def test_out_of_range_flag_is_refused_before_any_work(tmp_path):
    result = CliRunner().invoke(cli, ["logits", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"),
                                      "--top-k", "0"])
    assert result.exit_code == 2 and "--top-k" in result.output
    assert not (tmp_path / "o").exists()


def test_merge_takes_every_mergekit_option():
    from fusechat_merge.mergekit_options import OPTION_NAMES

    names = {p.name for p in cli.commands["merge"].params}
    assert names >= OPTION_NAMES


@pytest.mark.parametrize(("flag", "value"), [("--lambda", "1.5"), ("--lm-weight", "-0.1"), ("--temperature", "0"),
                                            ("--loss-type", "mse")])
def test_out_of_range_fuse_flag_is_refused_before_any_work(tmp_path, flag, value):
    result = CliRunner().invoke(cli, ["fuse", "--pivot", "p", "--aligned", str(tmp_path), "--out",
                                      str(tmp_path / "o"), flag, value])
    assert result.exit_code == 2 and flag in result.output
    assert not (tmp_path / "o").exists()


def test_cli_module_entry_point():
    proc = run([sys.executable, "-m", "fusechat_merge.cli", "--help"])
    assert "merge" in proc.stdout
