"""The error family every user-facing failure belongs to, and the one "did you mean".

A ``FusionError`` is a failure the user can fix: bad input, an output in the way, a
resource that does not fit. It carries what is at fault (a file, a row, a YAML key, a
model, a tensor) so every message can name it, and the exit code the command line
returns. Library code raises these and nothing click-specific; ``fusechat_merge.cli``
maps the family to exit codes in one place. Anything else reaching the command line is a
bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator


class FusionError(Exception):
    """A failure the user can fix. ``str()`` is the message shown, without a traceback.

    ``at`` holds what is at fault, by kind: ``file``, ``row``, ``key``, ``model``,
    ``tensor``, ``stage``. Subclasses set ``exit_code`` (1 unless said otherwise; 2 is a
    usage error, as click's).
    """

    exit_code: int = 1

    def __init__(self, message: str = "", **at: object) -> None:
        super().__init__(message)
        self.message = message
        self.at: dict[str, object] = {k: v for k, v in at.items() if v is not None}

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Crosses processes (Ray, datasets.map num_proc) as it was: message and what is at fault.
        return (_rebuild, (type(self), self.message, self.at, self.__dict__))


class UsageError(FusionError):
    """Options or arguments that cannot go together, or name nothing: exit 2, as click's."""

    exit_code = 2


class InputError(FusionError, ValueError):
    """An input that does not exist or cannot be used (a file, a row, a model, an option's
    value), or an output that would overwrite an input. A ValueError too, for callers
    that read bad values as such."""


class InputNotFound(FusionError, FileNotFoundError):  # noqa: N818 - named like FileNotFoundError
    """An input file or folder that is not there (a FileNotFoundError too)."""


def _rebuild(kind: type[FusionError], message: str, at: dict[str, object], state: dict[str, object]) -> FusionError:
    err = kind.__new__(kind)
    FusionError.__init__(err, message, **at)
    err.__dict__.update(state)
    return err


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err``, then what caused it (``__cause__``, else ``__context__``), and so on: where a
    full disk or an exhausted memory hides under a library's own error. Each once."""
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        yield current
        current = current.__cause__ or current.__context__


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the closest of ``candidates`` (empty: none close)."""
    close = [repr(c) for c in difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)]
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" (did you mean {listed}?)"
