"""Conversation data for FuseChat's stage 1 (teacher logits): load, parse, render, tokenize.

Every model that scores the data must see the same conversations and train on the same
characters, even though each model tokenizes them differently. So the unit of truth here is
the *rendered text* plus the character spans of the assistant replies in it; token ids, the
loss mask and per-token character offsets are derived from that text with the model's fast
tokenizer, which lets later stages align tokens of different vocabularies by characters.

Differences from the reference code (FuseAI ``FuseChat/train/train.py``), on purpose:

* Sequences are never padded; ``max_length`` only truncates.
* The loss mask comes from character spans, not from re-tokenizing each turn and counting
  tokens, so it cannot drift when a tokenizer merges characters across a turn boundary;
  rows it cannot place are reported instead of kept with a warning.
* ``system`` turns are accepted (the reference raises ``KeyError`` on them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fusion.errors import InputError, InputNotFound, causes
from fusion.options import LogitOptions, default_of

if TYPE_CHECKING:
    import datasets

T = TypeVar("T")
Role = Literal["system", "user", "assistant"]
TemplateKind = Literal["own", "shared"]
# the scoring path's defaults, declared by `LogitOptions` alone
TEMPLATE, MAX_LENGTH, SPLIT, STRICT = (default_of(LogitOptions, name)
                                       for name in ("template", "max_length", "split", "strict"))

# FuseChat-Mixture uses ShareGPT roles (human/gpt); OpenAI/HF use user/assistant. Either
# spelling is accepted in either format.
_ROLES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_MISREAD = "$~*?[]#%{}"

# The OpenChat-3.5 role text that FuseChat feeds to every model, pivot and sources alike.
SHARED_HEADS: dict[Role, str] = {
    "system": "",
    "user": "GPT4 Correct User: ",
    "assistant": "GPT4 Correct Assistant: ",
}


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


class _RowError(InputError):
    """What is wrong with one row: carries row_id and reason."""

    def __init__(self, row_id: str, reason: str):
        super().__init__(f"row {row_id}: {reason}", row=row_id)
        self.row_id = row_id
        self.reason = reason

    def __reduce__(self):
        # Keeps the two-argument constructor working across processes (datasets.map num_proc).
        return (type(self), (self.row_id, self.reason))


class MalformedRow(_RowError):  # noqa: N818 - the public name other modules import
    """A row that cannot be used: skipped and counted."""


class UnsupportedContent(_RowError):  # noqa: N818 - raised beside MalformedRow, read the same way
    """A row of a kind this tool cannot use at all (an image part): refused, not skipped; the
    corpus needs converting. `usable_rows` names the file."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized conversation.

    ``text`` is the full rendered text even when ``truncated``: offsets index into it, and
    later stages compare texts across tokenizers that cut at different characters.
    """

    input_ids: list[int]
    loss_mask: list[bool]
    token_offsets: list[tuple[int, int]]
    reply_spans: list[tuple[int, int]]
    text: str
    truncated: bool
    content_sha1: str = ""
    """`content_fingerprint` of the turns (set by `encode_rows`)."""


@dataclass
class EncodeReport:
    """What `encode_rows` kept and skipped; a repeated row id keeps only its last reason."""

    kept: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    skipped_rows: int = 0


# --------------------------------------------------------------------------- loading


def load_conversations(
    source: str, *, split: str = SPLIT, cache_dir: str | None = None
) -> datasets.Dataset:
    """Load conversations from a local .json/.jsonl/.parquet file or folder, or a hub dataset.

    What ``source`` names is `fusion.names.resolve`'s rule: a local path, else an ``org/name``
    hub dataset; anything else that does not exist raises InputNotFound (a
    FileNotFoundError) instead of falling through to a hub lookup. A
    JSON file holding one top-level list (FuseChat-Mixture's format) loads like JSON lines.
    A folder contributes its top-level data files, which must all be JSON or all Parquet
    with one row format (``datasets`` cannot merge schemas across files; one file may mix).
    Local files are cached by content (`fusion.data.content_cache`): what is parsed is what
    the records fingerprint, also after an in-place edit that kept size and mtime.
    """
    import datasets

    from fusion.data.content_cache import load_local

    files = _local_files(source)
    if files is None:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    builder = _builder_for(files)
    if builder == "json":
        for f in files:
            check_json_file(f)
    elif any(f.stat().st_size == 0 for f in files):
        raise InputError(f"{next(f for f in files if f.stat().st_size == 0)}: empty data file")
    try:
        rows = load_local(builder, files, names=_plain_names(files), split=split, cache_dir=cache_dir)
    except (datasets.exceptions.DatasetGenerationError, OSError) as err:
        cache_fault = _cache_write_fault(err, files)
        if cache_fault is not None:  # where the rows are copied to failed, not the corpus
            from fusion.artifacts.records import StoreError

            where = cache_dir or datasets.config.HF_DATASETS_CACHE
            raise StoreError(f"cannot write the datasets cache {where} while reading {source}: {cache_fault}; "
                             "the corpus is not at fault: free space or raise the file size limit there, or "
                             "give another cache_dir") from err
        if isinstance(err, OSError) or _ran_out(err):
            raise
        if len(files) < 2:
            raise InputError(f"{files[0]}: cannot read the rows ({err.__cause__ or err})") from None
        listing = "; ".join(f"{f.name}: {', '.join(_columns(f)) or '?'}" for f in files)
        raise InputError(f"{source}: its files hold rows of different formats, which cannot be read as one "
                         f"corpus ({listing}); convert them to one format (`conversations` or `messages`) "
                         "or give one file") from None
    if len(rows) == 0:
        raise InputError(f"{source}: the data holds no rows", file=str(source))
    return rows


def _cache_write_fault(err: BaseException, inputs: Sequence[Path]) -> str | None:
    """``File too large (PATH)`` when ``err`` or what caused it is a write refused for where it
    goes (full disk, quota, file size limit, read-only folder: `fusion.artifacts.write_faults.WRITE_ERRNOS`), not a
    corpus file that cannot be read."""
    from fusion.artifacts.write_faults import WRITE_ERRNOS

    read = {os.path.realpath(f) for f in inputs}
    for current in causes(err):
        where = getattr(current, "filename", None)
        if (isinstance(current, OSError) and current.errno in WRITE_ERRNOS
                and not (where and os.path.realpath(where) in read)):
            return os.strerror(current.errno) + (f" ({where})" if where else "")
    return None


def _ran_out(err: BaseException) -> bool:
    from fusion.runtime.memory_faults import ran_out

    return ran_out(err) is not None


def data_files(source: str) -> list[Path] | None:
    """The local data files behind ``source`` (in load order), or None for a hub dataset."""
    return _local_files(source)


def check_json_file(path: Path) -> None:
    """Raise ValueError naming the file and line of the first invalid JSON, or an empty file.

    Accepts JSON lines and a file holding one JSON value (FuseChat-Mixture's top-level list).
    """
    import json

    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"{path}: empty data file (no rows)", file=str(path))
    try:
        json.loads(text)
        return
    except json.JSONDecodeError:
        pass
    # JSON lines end at "\n" alone: U+2028, U+0085 and the like are valid inside a JSON string
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {number}: invalid JSON ({err.msg} at column {err.colno})",
                             file=str(path), row=number) from None
        if not isinstance(value, dict):
            raise InputError(f"{path}, line {number}: a row must be a JSON object, got {type(value).__name__}",
                             file=str(path), row=number)


def _local_files(source: str) -> list[Path] | None:
    """The data files behind ``source``, or None when it names a hub dataset (`fusion.names.resolve`)."""
    from fusion.names import LOCAL, MISSING, resolve

    found = resolve(source, what="dataset")
    if found.kind == MISSING:
        raise InputNotFound(f"conversation file not found: {source}"
                            + (" (a hub dataset is named org/name)" if "/" not in source else ""), file=str(source))
    if found.kind != LOCAL:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _LOCAL_BUILDERS
        )
        if not files:
            raise InputNotFound(f"no .json, .jsonl or .parquet files in folder {source}", file=str(source))
        return files
    if path.is_file():
        if path.suffix.lower() not in _LOCAL_BUILDERS:
            raise InputError(f"{source}: unsupported file type; use .json, .jsonl or .parquet", file=str(source))
        return [path]
    raise InputNotFound(f"{source} is neither a data file nor a folder", file=str(source))


def _plain_names(files: Sequence[Path]) -> list[Path]:
    """``files``, each one whose path datasets would misread (it expands ``$VAR`` and ``~``,
    takes ``* ? [`` as a pattern, ``#`` as a URL fragment) behind a symlink of a plain name
    (in the temporary folder, stable per file, so datasets' cache still finds it)."""
    import hashlib
    import tempfile

    out = []
    for f in files:
        f = f.absolute()
        if not any(c in str(f) for c in _MISREAD):
            out.append(f)
            continue
        folder = Path(tempfile.gettempdir()).absolute() / f"fusechat-data-links-{getattr(os, 'getuid', int)()}"
        link = folder / (hashlib.sha1(str(f).encode()).hexdigest()[:16] + f.suffix.lower())
        if any(c in str(link) for c in _MISREAD):
            raise InputError(f"{f}: datasets cannot read this path; rename it or its folders (no {_MISREAD})")
        folder.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() or link.readlink() != f:
            tmp = link.with_name(f".{link.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(f)
            tmp.replace(link)
        out.append(link)
    return out


def _builder_for(files: Sequence[Path]) -> str:
    builders = {_LOCAL_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        listing = "; ".join(f"{b}: {', '.join(f.name for f in files if _LOCAL_BUILDERS[f.suffix.lower()] == b)}"
                            for b in sorted(builders))
        raise InputError(f"{files[0].parent}: a data folder must hold only JSON(L) files or only Parquet "
                         f"files, this one holds both ({listing})")
    return builders.pop()


def _columns(path: Path) -> list[str]:
    """The top-level keys of a data file's first row (named when files disagree)."""
    import json

    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        first = json.loads(text)
        first = first[0] if isinstance(first, list) and first else first
    except json.JSONDecodeError:
        first = json.loads(next(line for line in text.split("\n") if line.strip()))
    return sorted(first) if isinstance(first, dict) else []


# --------------------------------------------------------------------------- parsing


def row_id(row: Mapping, index: int) -> str:
    """The row's own ``id`` when it has one (reports then point into the source file)."""
    value = row.get("id")
    return str(index) if value is None else str(value)


def content_fingerprint(turns: Sequence[Turn]) -> str:
    """sha1 of a conversation's content (roles and texts), independent of any template:
    two stores pair row by row only if their rows have the same fingerprints."""
    import hashlib
    import json

    payload = json.dumps([[t.role, t.content] for t in turns], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def parse_turns(row: Mapping, row_id: str) -> list[Turn]:
    """Turns of a ShareGPT (``conversations``/``from``/``value``) or OpenAI (``messages``/
    ``role``/``content``) row, validated for training.

    Allowed shape: an optional leading system turn, then user and assistant turns
    alternating, with at least one assistant turn. Like the reference code, an assistant
    turn that opens the conversation (before any user turn) is dropped: it answers nothing.
    """
    turns = [_parse_turn(item, n, row_id) for n, item in enumerate(_raw_turns(row, row_id))]
    turns = _drop_opening_reply(turns)
    _check_order(turns, row_id)
    return turns


def _raw_turns(row: Mapping, row_id: str) -> Sequence[Any]:
    # Arrow gives a missing column as None when files mix both formats, hence the None check.
    for key in ("conversations", "messages"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise MalformedRow(row_id, f"'{key}' is a {type(value).__name__}, not a list")
        if not value:
            raise MalformedRow(row_id, "empty conversation")
        return value
    raise MalformedRow(row_id, "no 'conversations' or 'messages' field")


def _first_set(item: Mapping, keys: Sequence[str]) -> Any:
    return next((item[k] for k in keys if item.get(k) is not None), None)


def _parse_turn(item: Any, n: int, row_id: str) -> Turn:
    if not isinstance(item, Mapping):
        raise MalformedRow(row_id, f"turn {n} is a {type(item).__name__}, not an object")
    role = _first_set(item, ("from", "role"))
    if role is None:
        raise MalformedRow(row_id, f"turn {n} has no 'from' or 'role'")
    if role not in _ROLES:
        raise MalformedRow(row_id, f"turn {n} has unknown role {role!r}")
    content = _first_set(item, ("value", "content"))
    if content is None:
        raise MalformedRow(row_id, f"turn {n} has no 'value' or 'content'")
    if isinstance(content, Sequence) and not isinstance(content, str | bytes):
        content = _text_parts(content, n, row_id)
    if not isinstance(content, str):
        raise MalformedRow(row_id, f"turn {n} content is a {type(content).__name__}, not a string")
    return Turn(_ROLES[role], content)


def _text_parts(parts: Sequence[Any], n: int, row_id: str) -> str:
    """OpenAI-format content given as parts (``[{"type": "text", "text": ...}, ...]``): the
    text parts joined by newlines, as vLLM's chat front end joins them. A part of another
    type (an image, audio) cannot be scored by a text model: `UnsupportedContent`."""
    texts = []
    for m, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise MalformedRow(row_id, f"turn {n} content part {m} is a {type(part).__name__}, not an object")
        kind = part.get("type")
        if kind != "text":
            raise UnsupportedContent(row_id, f"turn {n} content part {m} is of type {kind!r}; only text "
                                     "parts ({'type': 'text', 'text': ...}) can be scored: remove such rows "
                                     "or convert them to text")
        if not isinstance(part.get("text"), str):
            raise MalformedRow(row_id, f"turn {n} content part {m} has no 'text' string")
        texts.append(part["text"])
    return "\n".join(texts)


def _drop_opening_reply(turns: list[Turn]) -> list[Turn]:
    first = 1 if turns and turns[0].role == "system" else 0
    if len(turns) > first and turns[first].role == "assistant":
        return turns[:first] + turns[first + 1 :]
    return turns


def _check_order(turns: Sequence[Turn], row_id: str) -> None:
    first = 1 if turns and turns[0].role == "system" else 0
    for k, turn in enumerate(turns[first:]):
        expected = "user" if k % 2 == 0 else "assistant"
        if turn.role != expected:
            raise MalformedRow(
                row_id,
                f"turns do not alternate user/assistant: turn {first + k} is {turn.role}, "
                f"expected {expected}",
            )
    if not any(t.role == "assistant" for t in turns):
        raise MalformedRow(row_id, "no assistant turn")


# --------------------------------------------------------------------------- rendering


def render(
    tokenizer: Any,
    turns: Sequence[Turn],
    *,
    template: TemplateKind = TEMPLATE,
    max_length: int = MAX_LENGTH,
    row_id: str = "?",
) -> Encoded:
    """Render ``turns`` to text, tokenize it and mark the tokens to train.

    ``template="own"`` uses the tokenizer's chat template. If that template raises on a
    system turn (it has no system role), the system text is folded into the first user turn
    as ``"{system}\\n\\n{user}"``. A template that trims replies is supported; one that
    otherwise changes or drops reply text makes the row malformed.

    ``template="shared"`` is FuseChat's one role text for all models (OpenChat-3.5):
    ``{bos}{system}{sep}GPT4 Correct User: {user}{sep}GPT4 Correct Assistant: {reply}{sep}…``
    where ``sep`` is the tokenizer's eos text, ``bos`` its bos text (empty if it has none),
    and the ``{system}{sep}`` part appears only with a system turn.

    Trained tokens are those overlapping a reply's characters, plus the special token that
    closes each reply (eos or another special id) when it follows with no whitespace in
    between. Keeps the first ``max_length`` tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("render needs a fast tokenizer (PreTrainedTokenizerFast): it uses offsets")
    if max_length < 1:
        raise InputError(f"max_length must be positive, got {max_length}", key="max_length")
    if template == "own":
        text, spans = _render_own(tokenizer, turns, row_id)
    elif template == "shared":
        text, spans = render_shared(tokenizer, turns)
    else:
        raise InputError(f"unknown template {template!r}; use 'own' or 'shared'", key="template")
    return _encode_text(tokenizer, text, spans, max_length, row_id)


def render_shared(tokenizer: Any, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
    """FuseChat's shared OpenChat role text and the character spans of its replies."""
    sep = tokenizer.eos_token
    if not sep:
        raise InputError("the shared template needs a tokenizer with an eos_token")
    parts = [tokenizer.bos_token or ""]
    spans: list[tuple[int, int]] = []
    pos = len(parts[0])
    for turn in turns:
        start = pos + len(SHARED_HEADS[turn.role])
        parts += [SHARED_HEADS[turn.role], turn.content, sep]
        if turn.role == "assistant":
            spans.append((start, start + len(turn.content)))
        pos = start + len(turn.content) + len(sep)
    return "".join(parts), spans


def _render_own(
    tokenizer: Any, turns: Sequence[Turn], row_id: str
) -> tuple[str, list[tuple[int, int]]]:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("tokenizer has no chat template; use template='shared'")
    return with_system_fallback(lambda t: _render_own_once(tokenizer, t, row_id), turns, row_id)


def with_system_fallback(
    render_turns: Callable[[Sequence[Turn]], T], turns: Sequence[Turn], row_id: str,
    what: str = "conversation",
) -> T:
    """``render_turns(turns)``; a chat template that refuses the system role (Gemma-, some
    Mistral-style ones) gets the system text folded into the first user turn instead."""
    from jinja2.exceptions import TemplateError

    try:
        return render_turns(turns)
    except TemplateError as err:
        if not turns or turns[0].role != "system":
            raise MalformedRow(row_id, f"chat template refused the {what}: {err}") from err
    try:
        return render_turns(fold_system(turns, row_id))
    except TemplateError as err:
        raise MalformedRow(row_id, f"chat template refused the {what}: {err}") from err


def fold_system(turns: Sequence[Turn], row_id: str) -> list[Turn]:
    """The system text moved into the first user turn, for templates without a system role."""
    if len(turns) < 2 or turns[1].role != "user":
        raise MalformedRow(row_id, "a system turn must be followed by a user turn")
    system, user, *rest = turns
    return [Turn("user", f"{system.content}\n\n{user.content}"), *rest]


def _render_own_once(
    tokenizer: Any, turns: Sequence[Turn], row_id: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render with placeholders for the replies, then put the replies back.

    Placeholders locate each reply even when its text also occurs in another turn. The
    result must equal a plain render of the real turns, or the template changed a reply
    and the spans would be wrong; replies are tried as-is, then trimmed (many templates
    apply ``| trim`` to every message).
    """
    marks = _placeholders(turns)
    marked = _apply_template(tokenizer, chat_messages(turns, marks))
    real = _apply_template(tokenizer, chat_messages(turns, None))
    replies = [t.content for t in turns if t.role == "assistant"]
    for candidate in (replies, [r.strip() for r in replies]):
        text, spans = _fill_placeholders(marked, marks, candidate, row_id)
        if text == real:
            return text, spans
    raise MalformedRow(row_id, "the chat template rewrites assistant replies; cannot place them")


def _placeholders(turns: Sequence[Turn]) -> list[str]:
    """One marker per reply, built from a tag that occurs in no turn's text."""
    tag = "fusechat-reply"
    while any(tag in t.content for t in turns):
        tag += "#"
    return [f"[[{tag}:{k}]]" for k in range(sum(t.role == "assistant" for t in turns))]


def chat_messages(turns: Sequence[Turn], marks: Sequence[str] | None) -> list[dict[str, str]]:
    """Chat-template messages; with ``marks``, replies are replaced by their markers."""
    replies = iter(marks or ())
    return [
        {
            "role": t.role,
            "content": next(replies) if marks is not None and t.role == "assistant" else t.content,
        }
        for t in turns
    ]


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _fill_placeholders(
    marked: str, marks: Sequence[str], replies: Sequence[str], row_id: str
) -> tuple[str, list[tuple[int, int]]]:
    """Replace each marker with its reply, returning the text and the replies' spans."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = length = 0
    for n, (mark, reply) in enumerate(zip(marks, replies, strict=True)):
        count = marked.count(mark)
        if count != 1:
            raise MalformedRow(
                row_id,
                f"reply {n} appears {count} times in the chat template output, not once "
                "(the template drops or rewrites replies)",
            )
        at = marked.index(mark)
        if at < cursor:
            raise MalformedRow(row_id, f"the chat template moves reply {n} before reply {n - 1}")
        length += at - cursor
        pieces += [marked[cursor:at], reply]
        spans.append((length, length + len(reply)))
        length += len(reply)
        cursor = at + len(mark)
    pieces.append(marked[cursor:])
    return "".join(pieces), spans


# --------------------------------------------------------------------------- tokenizing


def _encode_text(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], max_length: int, row_id: str
) -> Encoded:
    # The rendered text already spells BOS and friends, so the tokenizer must add nothing.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    mask = loss_mask(ids, offsets, text, spans, end_of_turn_ids(tokenizer), row_id)
    return _truncate(Encoded(ids, mask, offsets, spans, text, False), max_length, row_id)


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that may close a reply: every special id plus eos."""
    ids = set(tokenizer.all_special_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def trained_positions(mask: Sequence[bool] | Any) -> Any:
    """Positions t whose next token is trained (``mask[t + 1]``): where a teacher
    distribution is stored and a fusion target exists (int64 numpy array)."""
    import numpy as np

    return np.flatnonzero(np.asarray(mask, dtype=bool)[1:]).astype(np.int64)


def loss_mask(
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    text: str,
    spans: Sequence[tuple[int, int]],
    eot_ids: frozenset[int],
    row_id: str = "?",
) -> list[bool]:
    """True on tokens overlapping a reply span and on each reply's closing special token.

    A token that straddles template text and a reply (e.g. '▁Hello' over the space before a
    reply) is trained: it is the token the model emits to start that reply. So is a
    whitespace-only token that ends exactly where a reply starts (the lone '▁' a
    SentencePiece tokenizer makes of "[/INST] 19"): the model must emit it before the reply,
    or greedy decoding never reaches the reply at all.
    """
    mask = [False] * len(ids)
    bounds = [s for s, _ in spans[1:]] + [len(text)]
    for n, (span, limit) in enumerate(zip(spans, bounds, strict=True)):
        hits = [i for i, (a, b) in enumerate(offsets) if a < b and a < span[1] and b > span[0]]
        if not hits:
            raise MalformedRow(row_id, f"reply {n} tokenizes to nothing")
        for i in hits:
            mask[i] = True
        lead = hits[0] - 1
        a, b = offsets[lead] if lead >= 0 else (0, 0)
        if lead >= 0 and b == span[0] and a < b and not text[a:b].strip():
            mask[lead] = True
        closer = _closing_token(ids, offsets, text, hits[-1], span[1], limit, eot_ids)
        if closer is not None:
            mask[closer] = True
    return mask


def _closing_token(
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    text: str,
    last: int,
    reply_end: int,
    limit: int,
    eot_ids: frozenset[int],
) -> int | None:
    """First special token after the reply, unless whitespace or the next reply comes first.

    Whitespace means the template moved on (e.g. ``\\n<|im_start|>user``), so a special
    token after it opens the next turn rather than closing this one.
    """
    for i in range(last + 1, len(ids)):
        start = offsets[i][0]
        if start >= limit or any(c.isspace() for c in text[reply_end:start]):
            return None
        if ids[i] in eot_ids:
            return i
    return None


def _truncate(enc: Encoded, max_length: int, row_id: str) -> Encoded:
    """Keep the first ``max_length`` tokens; reply spans are clipped at the last kept char."""
    if len(enc.input_ids) > max_length:
        offsets = enc.token_offsets[:max_length]
        cut = max(b for _, b in offsets)
        enc = replace(
            enc,
            input_ids=enc.input_ids[:max_length],
            loss_mask=enc.loss_mask[:max_length],
            token_offsets=offsets,
            reply_spans=[(s, min(e, cut)) for s, e in enc.reply_spans if s < cut],
            truncated=True,
        )
    if not any(enc.loss_mask):
        where = f"within the first {max_length} tokens" if enc.truncated else "in the row"
        raise MalformedRow(row_id, f"no trained token {where}")
    return enc


# --------------------------------------------------------------------------- batches


def usable_rows(
    rows: Sequence[Mapping] | Iterable[Mapping],
    make: Callable[[str, list[Turn]], T],
    *,
    indices: Iterable[int] | None = None,
    strict: bool = STRICT,
    report: EncodeReport | None = None,
    source: str | None = None,
) -> Iterator[tuple[str, T]]:
    """Yield ``(row id, make(row id, turns))`` for each row that parses and ``make`` accepts.

    The one loop over a corpus: malformed rows (`MalformedRow` from parsing or from
    ``make``) are skipped and recorded in ``report`` (filled as the iterator advances, so
    read it after exhausting it), or, with ``strict=True``, the first one raises. A row
    of content no text model can use (`UnsupportedContent`) is a ValueError naming
    ``source`` (the corpus) and the row. ``indices`` selects rows of an indexable corpus
    (a ``--shard`` block).
    """
    report = EncodeReport() if report is None else report
    pairs = ((i, rows[i]) for i in indices) if indices is not None else enumerate(rows)  # type: ignore[index]
    for index, row in pairs:
        rid = row_id(row, index)
        try:
            value = make(rid, parse_turns(row, rid))
        except UnsupportedContent as err:
            raise InputError(f"{source}: {err}" if source else str(err), file=source, row=err.row_id) from None
        except MalformedRow as err:
            if strict:
                raise
            report.skipped[rid] = err.reason
            report.skipped_rows += 1
            continue
        report.kept += 1
        yield rid, value


def encode_rows(
    rows: Sequence[Mapping] | Iterable[Mapping],
    tokenizer: Any,
    *,
    template: TemplateKind = TEMPLATE,
    max_length: int = MAX_LENGTH,
    strict: bool = STRICT,
    report: EncodeReport | None = None,
    indices: Iterable[int] | None = None,
    source: str | None = None,
) -> Iterator[tuple[str, Encoded]]:
    """Yield ``(row id, Encoded)`` for each usable row (see `usable_rows`)."""

    def encode(rid: str, turns: list[Turn]) -> Encoded:
        enc = render(tokenizer, turns, template=template, max_length=max_length, row_id=rid)
        return replace(enc, content_sha1=content_fingerprint(turns))

    return usable_rows(rows, encode, indices=indices, strict=strict, report=report, source=source)
