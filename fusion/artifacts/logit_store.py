"""The logit store: per-sequence top-K next-token distributions on disk.

Format (documented in ``docs/logit-store.md``): a directory with ``manifest.json`` and
Arrow stream shards ``shard-NNNNN.arrow`` readable with ``datasets.Dataset.from_file``
(memory-mapped, so a reader never loads the whole store). One row per sequence:

=================  ==============================  =========================================
column             Arrow type                      meaning
=================  ==============================  =========================================
id                 string                          the corpus row id
input_ids          list<uint16|uint32>             token ids, never padded
loss_mask          list<bool>                      trained tokens (replies + end of turn)
token_offsets      list<int32>                     char [start, end) per token, flattened
reply_spans        list<int32>                     char [start, end) per reply, flattened
topk_ids           list<uint16|uint32>             P×K, flattened: top-K ids per trained position
topk_logprobs      list<float16>                   P×K, flattened: their log-probabilities
target_logprobs    list<float32>                   P: log-probability of the actual next token
seq_ce             float32                         mean NLL over trained tokens (MinCE metric)
text_sha1          string                          sha1 of the conversation's roles and texts
                                                   (`fusion.data.conversations.content_fingerprint`; v2)
=================  ==============================  =========================================

A *trained position* is a position t whose next token t+1 is trained
(``loss_mask[t + 1]``): the distribution at t predicts it. P = ``sum(loss_mask[1:])``.
Ids use uint16 when the vocabulary fits (exact), else uint32.

Atomicity: each shard is written to a temporary file and renamed; ``manifest.json`` is
written last, so a directory without it is an unfinished store (``run.json``, the run
record, holds the options and the fingerprints of the model, tokenizer and data, so a
re-run resumes shard by shard and refuses changed inputs; a run.json without any shard
is a run that failed before its first shard, and is replaced). The manifest lists each
shard's size and sha256: a truncated or corrupt shard is named when the store is opened.

The aligned store (`fusion.artifacts.aligned_store`) is this format plus columns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc  # a submodule: ``import pyarrow`` alone does not load it

from fusion.artifacts.atomic import atomic_path, write_text_atomic
from fusion.artifacts.lifecycle import RUN_FILE, START_OVER, Output, writing
from fusion.artifacts.provenance import store_fingerprint
from fusion.artifacts.records import StoreError, read_record, write_record
from fusion.data.conversations import trained_positions
from fusion.options import LogitOptions, default_of, parse_shard

FORMAT = "fusechat-logit-store"
FORMAT_VERSION = 2
"""2 adds the ``text_sha1`` column; version-1 stores are read (without row fingerprints)
but not aligned."""
MANIFEST = "manifest.json"
SCORING_FILE = "scoring.json"
"""Tokens, seconds, tokens/s, padding share of the run that finished the store (a combined
store: ``{"parts": [...]}``); never part of the store's fingerprint."""


@dataclass
class SequenceLogits:
    """One stored sequence (numpy arrays; shapes in comments)."""

    id: str
    input_ids: np.ndarray  # (T,)
    loss_mask: np.ndarray  # (T,) bool
    token_offsets: np.ndarray  # (T, 2) int32
    reply_spans: np.ndarray  # (R, 2) int32
    topk_ids: np.ndarray  # (P, K)
    topk_logprobs: np.ndarray  # (P, K) float16
    target_logprobs: np.ndarray  # (P,) float32
    seq_ce: float
    text_sha1: str = ""  # the conversation's content fingerprint ("" in version-1 stores)

    @property
    def positions(self) -> np.ndarray:
        """Trained positions t (the distribution at t predicts token t + 1)."""
        return trained_positions(self.loss_mask)


def id_type_for(vocab_size: int) -> str:
    """``uint16`` when every id fits (exact, half the bytes), else ``uint32``."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def id_dtypes(id_type: str) -> tuple[type, pa.DataType]:
    """The numpy and Arrow types of token ids in a store of ``id_type``."""
    if id_type == "uint16":
        return np.uint16, pa.uint16()
    if id_type == "uint32":
        return np.uint32, pa.uint32()
    raise ValueError(f"unknown id type {id_type!r}")


@dataclass
class StoreOptions:
    """What a store was made from and how; a resumed run must match exactly."""

    model: str
    tokenizer_fingerprint: str
    vocab_size: int
    template: str
    top_k: int
    max_length: int
    backend: str
    dtype: str
    data: str
    shard: str = default_of(LogitOptions, "shard")
    rows_per_shard: int = default_of(LogitOptions, "rows_per_shard")
    package_version: str = ""
    model_fingerprint: str = ""
    """`fusion.artifacts.provenance.model_fingerprint` of the weights and config."""
    data_fingerprint: str = ""
    """sha256 of the data files' bytes (a hub dataset: its datasets fingerprint)."""

    @property
    def id_type(self) -> str:
        return id_type_for(self.vocab_size)


@dataclass
class Manifest:
    format: str
    format_version: int
    options: StoreOptions
    shards: list[dict[str, Any]]
    sequences: int
    tokens: int
    skipped: dict[str, str] = field(default_factory=dict)
    alignment: dict[str, Any] | None = None
    """Set in aligned stores: source store, method, vocabulary map, statistics."""
    rows: dict[str, int] | None = None
    """The corpus rows scored: ``{"start", "stop", "corpus"}`` (``--shard`` block of a
    corpus of ``corpus`` rows); `merge_stores` checks that the parts tile the corpus."""
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["options"] = StoreOptions(**raw["options"])
        return cls(**raw)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest at ``path``, or a StoreError naming the file and what is wrong."""
        try:
            manifest = cls.from_json(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{path}: broken manifest, not valid JSON ({err})") from None
        except (TypeError, KeyError, AttributeError) as err:
            raise StoreError(f"{path}: broken manifest, missing or unknown fields ({err})") from None
        if not isinstance(manifest.shards, list) or not all(
            isinstance(sh, dict) and {"file", "sequences", "bytes"} <= set(sh) for sh in manifest.shards
        ):
            raise StoreError(f"{path}: broken manifest, 'shards' must list {{file, sequences, bytes}}")
        return manifest


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, added tokens, normalisers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    else:
        payload = backend.to_str()
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def arrow_schema(id_type: str) -> pa.Schema:
    _, ids = id_dtypes(id_type)
    return pa.schema(
        [
            ("id", pa.string()),
            ("input_ids", pa.list_(ids)),
            ("loss_mask", pa.list_(pa.bool_())),
            ("token_offsets", pa.list_(pa.int32())),
            ("reply_spans", pa.list_(pa.int32())),
            ("topk_ids", pa.list_(ids)),
            ("topk_logprobs", pa.list_(pa.float16())),
            ("target_logprobs", pa.list_(pa.float32())),
            ("seq_ce", pa.float32()),
            ("text_sha1", pa.string()),
        ]
    )


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def write_shard(
    path: Path,
    records: Sequence[SequenceLogits],
    id_type: str,
    extra: Mapping[str, tuple[pa.DataType, list[Any]]] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write records as one Arrow stream file, atomically; returns the bytes written.

    ``extra`` adds columns (name → (type, values per record)) and ``metadata`` schema
    metadata kept with the shard, as the aligned store does.
    """
    schema = arrow_schema(id_type)
    for name, (dtype, _) in (extra or {}).items():
        schema = schema.append(pa.field(name, dtype))
    if metadata:
        schema = schema.with_metadata(dict(metadata))
    np_ids, _ = id_dtypes(id_type)
    columns = {
        "id": [r.id for r in records],
        "input_ids": [np.asarray(r.input_ids, dtype=np_ids) for r in records],
        "loss_mask": [np.asarray(r.loss_mask, dtype=bool) for r in records],
        "token_offsets": [np.asarray(r.token_offsets, dtype=np.int32).reshape(-1) for r in records],
        "reply_spans": [np.asarray(r.reply_spans, dtype=np.int32).reshape(-1) for r in records],
        "topk_ids": [np.asarray(r.topk_ids, dtype=np_ids).reshape(-1) for r in records],
        "topk_logprobs": [np.asarray(r.topk_logprobs, dtype=np.float16).reshape(-1) for r in records],
        "target_logprobs": [np.asarray(r.target_logprobs, dtype=np.float32) for r in records],
        "seq_ce": [float(r.seq_ce) for r in records],
        "text_sha1": [r.text_sha1 for r in records],
    }
    columns.update({name: values for name, (_, values) in (extra or {}).items()})
    table = pa.table(columns, schema=schema)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)
        size = tmp.stat().st_size
    return size


# Where the inputs lay when a store was started: kept in its records for the reader, never
# compared (their content fingerprints are), so a moved or copied work dir still resumes.
LOCATION_FIELDS = ("model", "data")

# The scoring run's inputs: what a mismatch with its run record says.
SCORING_INPUTS = {
    "model_fingerprint": "model weights or config changed since this store was started",
    "tokenizer_fingerprint": "tokenizer changed since this store was started",
    "data_fingerprint": "data content changed since this store was started",
}


def has_shards(out: Path) -> bool:
    """Whether a run got as far as a shard (or a finished store): what a resume can use."""
    return (out / MANIFEST).exists() or any(out.glob("shard-*.arrow"))


def store_output(out: str | os.PathLike[str], record: Mapping[str, Any], *, what: str = "the logit store",
                 reads: Mapping[str, str | os.PathLike[str] | None] | None = None,
                 inputs: Mapping[str, str] = SCORING_INPUTS,
                 located: tuple[str, ...] = LOCATION_FIELDS) -> Output:
    """A store as an output of `fusion.artifacts.lifecycle`: written shard by shard (each
    kept), its manifest last; ``record`` (its run record, `RUN_FILE`) holds the options and
    input fingerprints (``inputs``: what their change means; ``located``: where the inputs
    lay, never compared)."""
    return Output(out, what, record, reads=reads or {}, inputs=inputs, located=located, marks=(MANIFEST,),
                  pieces=has_shards, kept=shards_kept)


def shards_kept(out: Path) -> str:
    """What of a failed scoring or alignment run is kept, in words."""
    return "its complete shards are kept: the same command resumes" if out.is_dir() and has_shards(out) else \
        "nothing of it was kept"


def finish_run(
    out: Path,
    options: StoreOptions,
    skipped: Mapping[str, str],
    alignment: dict[str, Any] | None = None,
    rows: Mapping[str, int] | None = None,
    scoring: dict[str, Any] | None = None,
) -> Manifest:
    """Write the manifest over the finished shards: the store is complete from now on.
    ``scoring`` (what the run measured: `fusion.capture.throughput.Throughput.record`) goes to
    `SCORING_FILE`, so two runs of the same scoring make byte-identical manifests."""

    shards, sequences, tokens = [], 0, 0
    for path in sorted(out.glob("shard-*.arrow")):
        table = _read_table(path)
        n_rows = table.num_rows
        n_tokens = int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
        shards.append({"file": path.name, "sequences": n_rows, "tokens": n_tokens, "bytes": path.stat().st_size,
                       "sha256": file_sha256(path)})
        sequences += n_rows
        tokens += n_tokens
    manifest = Manifest(
        FORMAT, FORMAT_VERSION, options, shards, sequences, tokens, dict(skipped), alignment,
        dict(rows) if rows is not None else None,
    )
    if scoring is not None:  # a measurement, not content: beside the manifest, out of its fingerprint
        write_record(out / SCORING_FILE, scoring)
    write_text_atomic(out / MANIFEST, manifest.to_json())
    return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**23), b""):
            h.update(block)
    return h.hexdigest()


def _read_table(path: Path) -> pa.Table:
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise StoreError(f"{path}: truncated or corrupt shard ({err})", START_OVER) from None


class LogitStore:
    """Reads a finished store. Rows are memory-mapped through ``datasets``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not self.path.exists():
            raise StoreError(f"store path {self.path} does not exist")
        if not manifest.is_file():
            hint = " (an unfinished run: run the same command again to resume)" if (
                self.path / RUN_FILE
            ).exists() else ""
            raise StoreError(f"{self.path} is not a finished logit store: no {MANIFEST}{hint}")
        self.manifest = Manifest.read(manifest)
        if self.manifest.format != FORMAT or self.manifest.format_version > FORMAT_VERSION:
            raise StoreError(
                f"{manifest}: format {self.manifest.format} v{self.manifest.format_version} "
                f"is not readable by this version (reads {FORMAT} v{FORMAT_VERSION})"
            )
        for shard in self.manifest.shards:  # cheap: sizes only (verify() reads the bytes)
            file = self.path / shard["file"]
            if not file.is_file():
                raise StoreError(f"{file}: shard listed in {manifest} is missing")
            if file.stat().st_size != shard["bytes"]:
                raise StoreError(f"{file}: truncated or corrupt shard ({file.stat().st_size} bytes, "
                                 f"the manifest says {shard['bytes']})")
        self._dataset = None

    @property
    def has_row_fingerprints(self) -> bool:
        return self.manifest.format_version >= 2

    def verify(self) -> None:
        """Check every shard's bytes against the manifest's sha256 (StoreError naming the file)."""
        for shard in self.manifest.shards:
            file = self.path / shard["file"]
            if shard.get("sha256") and file_sha256(file) != shard["sha256"]:
                raise StoreError(f"{file}: corrupt shard (its sha256 differs from the manifest's)")

    @property
    def options(self) -> StoreOptions:
        return self.manifest.options

    @property
    def dataset(self):
        """All shards as one memory-mapped ``datasets.Dataset`` (numpy format)."""
        if self._dataset is None:
            import datasets

            parts = []
            for s in self.manifest.shards:
                try:
                    parts.append(datasets.Dataset.from_file(str(self.path / s["file"]), in_memory=False))
                except (pa.ArrowInvalid, OSError, ValueError) as err:
                    raise StoreError(f"{self.path / s['file']}: truncated or corrupt shard ({err})") from None
            ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else None
            if ds is None:
                ds = datasets.Dataset.from_dict({}, features=None)
            self._dataset = ds.with_format("numpy")
        return self._dataset

    @property
    def scoring(self) -> dict[str, Any] | None:
        """What the scoring run measured (`SCORING_FILE`), None when it was not recorded."""
        path = self.path / SCORING_FILE
        return read_record(path) if path.is_file() else None

    def __len__(self) -> int:
        return self.manifest.sequences

    def __getitem__(self, index: int) -> SequenceLogits:
        return self._record(self.dataset[index])

    def __iter__(self) -> Iterator[SequenceLogits]:
        for i in range(len(self)):
            yield self[i]

    def ids(self) -> list[str]:
        return [str(x) for x in self.dataset["id"]] if len(self) else []

    def row_fingerprints(self) -> list[str]:
        """Each row's content fingerprint (``text_sha1``), in order; empty strings in v1 stores."""
        if not len(self):
            return []
        if "text_sha1" not in self.dataset.column_names:
            return [""] * len(self)
        return [str(x) for x in self.dataset["text_sha1"]]

    def _record(self, row: Mapping[str, Any]) -> SequenceLogits:
        k = self.options.top_k
        return SequenceLogits(
            id=str(row["id"]),
            input_ids=np.asarray(row["input_ids"]),
            loss_mask=np.asarray(row["loss_mask"], dtype=bool),
            token_offsets=np.asarray(row["token_offsets"], dtype=np.int32).reshape(-1, 2),
            reply_spans=np.asarray(row["reply_spans"], dtype=np.int32).reshape(-1, 2),
            topk_ids=np.asarray(row["topk_ids"]).reshape(-1, k),
            topk_logprobs=np.asarray(row["topk_logprobs"], dtype=np.float16).reshape(-1, k),
            target_logprobs=np.asarray(row["target_logprobs"], dtype=np.float32),
            seq_ce=float(row["seq_ce"]),
            text_sha1=str(row.get("text_sha1", "") or ""),
        )

    def bytes_per_token(self) -> float:
        total = sum(s["bytes"] for s in self.manifest.shards)
        return total / max(1, self.manifest.tokens)


def _open_part(number: int, count: int, path: Path) -> LogitStore:
    if not path.exists():
        raise StoreError(f"part {number + 1} of {count}: {path} does not exist")
    try:
        return LogitStore(path)
    except StoreError as err:
        raise StoreError(f"part {number + 1} of {count}: {err}") from err
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise StoreError(f"part {number + 1} of {count}: cannot read {path / MANIFEST}: {err}") from err


def _part_shard(store: LogitStore) -> tuple[int, int]:
    spec = str(store.options.shard)
    try:
        return parse_shard(spec)
    except ValueError:
        raise StoreError(f"{store.path}: its manifest has an invalid shard {spec!r} (expected i/N)") from None


def check_parts(stores: Sequence[LogitStore]) -> dict[str, int] | None:
    """Check that ``stores`` are the N parts of one ``--shard i/N`` split, in order.

    They must agree on every option but ``shard`` (the same model, tokenizer, data,
    template, K, ...), all say N, and be parts 0..N-1 exactly once each, in that order;
    their corpus row blocks must tile the same corpus. Returns the merged row block.
    """
    first = stores[0]
    wanted = asdict(first.options)
    for store in stores[1:]:
        other = asdict(store.options)
        diffs = [
            f"{k}: {other.get(k)!r} there, {v!r} in {first.path}"
            for k, v in wanted.items()
            if k not in ("shard", "package_version", *LOCATION_FIELDS) and other.get(k) != v
        ]
        if diffs:
            raise StoreError(
                f"{store.path} is not a part of the same run as {first.path} ({'; '.join(diffs)})"
            )
    specs = [_part_shard(s) for s in stores]
    counts = {count for _, count in specs}
    if len(counts) > 1:
        listing = ", ".join(f"{s.path}: {s.options.shard}" for s in stores)
        raise StoreError(f"the parts come from different --shard splits ({listing})")
    (count,) = counts
    by_index: dict[int, list[Path]] = {}
    for store, (index, _) in zip(stores, specs, strict=True):
        by_index.setdefault(index, []).append(store.path)
    twice = {i: paths for i, paths in by_index.items() if len(paths) > 1}
    if twice:
        i, paths = min(twice.items())
        raise StoreError(f"part {i}/{count} is given {len(paths)} times: {', '.join(map(str, paths))}")
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        names = ", ".join(f"{i}/{count}" for i in missing)
        raise StoreError(
            f"missing part{'s' if len(missing) > 1 else ''} {names} of the --shard split "
            f"(got {', '.join(s.options.shard for s in stores)}): run `fusechat-merge logits "
            f"--shard {missing[0]}/{count}` with the same options and add its store"
        )
    order = [index for index, _ in specs]
    if order != sorted(order):
        listing = " ".join(str(by_index[i][0]) for i in range(count))
        raise StoreError(
            f"give the parts in order 0..{count - 1} (got {', '.join(s.options.shard for s in stores)}): "
            f"{listing}"
        )
    blocks = [s.manifest.rows for s in stores]
    if any(b is None for b in blocks):
        return None  # stores from before row blocks were recorded: the shard specs must do
    corpus = {b["corpus"] for b in blocks}
    if len(corpus) > 1:
        listing = ", ".join(f"{s.path}: {s.manifest.rows['corpus']}" for s in stores)
        raise StoreError(f"the parts were scored on corpora of different sizes ({listing}): the data changed")
    for prev, store in zip(stores, stores[1:], strict=False):
        if prev.manifest.rows["stop"] != store.manifest.rows["start"]:
            raise StoreError(
                f"{store.path} starts at corpus row {store.manifest.rows['start']}, but "
                f"{prev.path} ends at row {prev.manifest.rows['stop']}"
            )
    return {"start": blocks[0]["start"], "stop": blocks[-1]["stop"], "corpus": blocks[0]["corpus"]}


def merge_stores(parts: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                 overwrite: bool = False) -> Manifest:
    """Combine the stores of ``--shard i/N`` runs into one store, in part order.

    The parts are checked first (`check_parts`). Shards are hard-linked (copied across
    file systems) and renumbered in a staging directory published as ``out`` when
    complete (`fusion.artifacts.lifecycle`: a whole output), so no half-merged store ever
    looks finished. A combined store of the same parts is left as it is; one of other parts
    is refused unless ``overwrite``.
    """

    if not parts:
        raise StoreError("no stores to merge")
    paths = [Path(p) for p in parts]
    stores = [_open_part(i, len(paths), p) for i, p in enumerate(paths)]
    rows = check_parts(stores)
    options = StoreOptions(**{**asdict(stores[0].options), "shard": "0/1"})
    record = {**asdict(options), "parts": [str(s.path) for s in stores],
              "part_stores": [store_fingerprint(s.path) for s in stores]}
    output = Output(out, "the combined logit store", record, whole=True,
                    reads={f"part {i + 1} of {len(stores)}": s.path for i, s in enumerate(stores)},
                    inputs={"part_stores": "the part stores changed since this store was combined"},
                    located=(*LOCATION_FIELDS, "parts"), marks=(MANIFEST,))
    with writing(output, overwrite=overwrite) as made:
        if made.state == "done":
            return LogitStore(made.out).manifest
        return _merge_into(stores, options, rows, made.dir)


def _merge_into(stores: Sequence[LogitStore], options: StoreOptions, rows: dict[str, int] | None,
                tmp: Path) -> Manifest:
    index = 0
    skipped: dict[str, str] = {}
    for store in stores:
        skipped.update(store.manifest.skipped)
        for shard in store.manifest.shards:
            source = store.path / shard["file"]
            if not source.is_file():
                raise StoreError(f"{store.path}: {shard['file']} (listed in {MANIFEST}) is missing")
            target = tmp / shard_name(index)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            index += 1
    return finish_run(tmp, options, skipped, rows=rows, scoring={"parts": [store.scoring for store in stores]})
