"""The one place the command line turns errors into messages and exit codes.

Every command runs under `FusionGroup`: a `fusion.errors.FusionError` (the family every
user-facing error belongs to) is printed as ``Error: <message>`` on stderr, without a
traceback, and the command exits with the error's ``exit_code`` (1; 2 for a usage
error). Third-party errors that reach the user are translated here too (`user_error`): a
YAML file that does not parse, a write that fails for lack of space, quota or permission.
click's own usage errors are click's (exit 2), a stop on SIGTERM or Ctrl-C exits with 143
or 130 (`fusechat_merge.console.stopping_cleanly`), and anything else keeps its traceback:
it is a bug.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from fusion.errors import FusionError, InputError


class UserFacing(click.ClickException):
    """A `FusionError` on its way out: click prints ``Error: <message>`` and exits with its code."""

    def __init__(self, err: FusionError) -> None:
        super().__init__(str(err))
        self.exit_code = err.exit_code
        self.error = err


def user_error(err: BaseException) -> FusionError | None:
    """``err`` as the user should meet it: itself when it is a `FusionError`, a translation of
    a third-party error the user can fix, or None (a bug: it keeps its traceback)."""
    if isinstance(err, FusionError):
        return err
    yaml = sys.modules.get("yaml")  # loaded when something read YAML
    if yaml is not None and isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        name = getattr(mark, "name", None)
        return InputError(f"not valid YAML: {err}", file=name if name and not name.startswith("<") else None)
    from fusion.artifacts.write_faults import write_fault

    fault = write_fault(err, os.sep)  # a full disk, a quota, a read-only folder, anywhere
    if fault is not None:
        return FusionError(f"the filesystem refused: {fault}", file=getattr(err, "filename", None))
    return None


class FusionGroup(click.Group):
    """A click group whose commands' user-facing errors end as messages and exit codes
    (`user_error`), each mapped once here rather than in each command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            user = user_error(err)
            if user is None:
                raise
            raise UserFacing(user) from err
