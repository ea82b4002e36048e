"""The command line: every command answers --help, options come from the stage dataclasses."""

from __future__ import annotations

import dataclasses
import sys

import click
import pytest
from click.testing import CliRunner
from helpers import run

from fusechat_merge.cli import main as cli
from fusion.options import AlignOptions, LogitOptions, bounds, option_fields

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


@pytest.mark.parametrize(("command", "cls"), [("logits", LogitOptions), ("align", AlignOptions)])
def test_stage_options_are_generated_from_their_dataclass(command, cls):
    params = {p.name: p for p in cli.commands[command].params}
    for f in option_fields(cls):
        param = params[f.name]
        assert param.opts == ["--" + f.name.replace("_", "-")]
        assert param.default == f.default and param.help == f.metadata["help"]
        if "choices" in f.metadata:
            assert tuple(param.type.choices) == f.metadata["choices"]
        limits = bounds(f)
        if limits["min"] is not None:
            assert param.type.min == limits["min"]
        if limits["max"] is not None:
            assert param.type.max == limits["max"]


def test_out_of_range_flag_is_refused_before_any_work(tmp_path):
    result = CliRunner().invoke(cli, ["logits", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"),
                                      "--top-k", "0"])
    assert result.exit_code == 2 and "--top-k" in result.output
    assert not (tmp_path / "o").exists()


def test_merge_takes_every_mergekit_option():
    from fusechat_merge.mergekit_options import OPTION_NAMES

    names = {p.name for p in cli.commands["merge"].params}
    assert names >= OPTION_NAMES


def test_fuse_flags_match_the_fusion_settings():
    from fusion.options import FusionSettings

    params = {p.name: p for p in cli.commands["fuse"].params}
    for f in dataclasses.fields(FusionSettings):
        assert f.metadata["help"] in params[f.name].help


def test_cli_module_entry_point():
    proc = run([sys.executable, "-m", "fusechat_merge.cli", "--help"])
    assert "merge" in proc.stdout
