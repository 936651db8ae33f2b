"""The read loop every file reader shares, and `file_reader`, which makes a dataset's Reader from its options.

A reader turns one published file into `items` / `statements` rows; every record it reads either ends in those
rows or in `rejects` with a reason of schemas/rejects.py, so that n_read == n_kept + len(rejects) always. A file
that is not the format at all raises FormatError at once instead. A reader module declares only how one record
parses (a function returning `Parsed`) and its options; `file_reader` does the rest.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.rejects import DUPLICATE_ID, MALFORMED_JSON, NOT_AN_OBJECT, UNDECODABLE
from tasks.core.config import IngestConfig
from tasks.ingest.formats.fields import RecordReject
from tasks.ingest.formats.items import (
    Parsed,
    ReadOptions,
    check_texts,
    content_hash,
    fit_context,
    item_row,
    reject_row,
    sample_positions,
    substitution_labels,
    target_sentence,
)
from tasks.ingest.formats.records import MAX_DEPTH, RawRecord, has_surrogates, load_format, nesting, require_path
from tasks.ingest.formats.splits import split_groups


@dataclass
class Ingested:
    """Rows of the three ingest tables plus the counts of the summary line."""

    dataset: str
    items: list[dict] = field(default_factory=list)
    statements: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    n_read: int = 0
    n_kept: int = 0
    note: str = ""

    def summary(self) -> str:
        """One line a human reads after the stage: nothing may vanish between read and kept + rejected."""
        reasons = Counter(r["reason"] for r in self.rejects)
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        line = f"{self.dataset}: {self.n_read} read, {self.n_kept} kept, {len(self.rejects)} rejected"
        line += f" ({detail})" if detail else ""
        return f"{line} [{self.note}]" if self.note else line


@dataclass(frozen=True)
class Reader:
    """One --dataset value: how to read it, what files it stands for, where to get them."""

    name: str
    read: Callable[[Path | None, ReadOptions], Ingested]
    version: str
    files: Callable[[Path | None], list[Path]]
    summary: str
    source: str
    needs_path: bool = True
    version_of: Callable[[IngestConfig], str] | None = None  # a version that depends on the options

    def loader_version(self, ingest: IngestConfig) -> str:
        """The version provenance records: the generator an option selects may differ from the default."""
        return self.version_of(ingest) if self.version_of else self.version


@dataclass(frozen=True)
class FileFormat:
    """What a dataset that is one user-supplied file declares: the fields a record must carry and its parser."""

    name: str
    source: str
    required: tuple[str, ...]
    parse: Callable[[dict], Parsed]
    id_field: str | None = None  # the field whose value names a rejected record (rejects.record_id)
    nested_squad: bool = False  # also accept the official nested SQuAD JSON
    finish: Callable[[Ingested], None] | None = None  # a last pass over the rows (e.g. dedupe statements)

    def files(self, path: Path | None) -> list[Path]:
        """The one input file, with where to get it when it is missing."""
        return [require_path(path, self.name, self.source)]

    def read(self, path: Path | None, opts: ReadOptions) -> Ingested:
        """Load the file, stop if it is not the format, read every (sampled) record."""
        (path,) = self.files(path)
        records = load_format(path, self.name, self.required, nested_squad=self.nested_squad)
        out = read_dataset(self.name, path.name, records, opts, self.parse, id_field=self.id_field)
        if self.finish is not None:
            self.finish(out)
        return out


def file_reader(
    name: str,
    summary: str,
    source: str,
    required: Iterable[str],
    parse: Callable[[dict], Parsed],
    version: str,
    *,
    id_field: str | None = None,
    nested_squad: bool = False,
    finish: Callable[[Ingested], None] | None = None,
) -> Reader:
    """The Reader of a dataset that is one user-supplied JSON / JSONL / Parquet file of records."""
    fmt = FileFormat(name, source, tuple(required), parse, id_field, nested_squad, finish)
    return Reader(name=name, read=fmt.read, version=version, files=fmt.files, summary=summary, source=source)


def _record_id(dataset: str, raw: Any, id_field: str | None) -> str | None:
    """The reject's record_id: the item id the record would have had, where its format carries ids."""
    if id_field and isinstance(raw, dict) and raw.get(id_field) is not None:
        return f"{dataset}-{raw[id_field]}"
    return None


def _finish_item(dataset: str, parsed: Parsed, opts: ReadOptions) -> tuple[str, dict]:
    """(dedupe key, item row) of a parsed record: id, token budget, target sentence."""
    item = dict(parsed.item)
    check_texts(item["question"], item["context"], opts)
    key = parsed.source_id or content_hash(item["question"], item["context"], item["answers"])
    context, truncated = fit_context(item["context"], opts)
    target = target_sentence(context, item["answers"], item.get("orig_context")) if parsed.locate_target else None
    row = item_row(dataset, **{**item, "context": context, "truncated": truncated, "target_sentence": target})
    if row["sentence_labels"] is None and row["counterfactual"]:
        row["sentence_labels"] = substitution_labels(context, item["answers"], item.get("orig_context"))
    row["item_id"] = f"{dataset}-{key}"
    row["source_id"] = parsed.source_id
    return key, row


def _assign_splits(out: Ingested, rng: random.Random) -> None:
    """Split groups 60/20/20 with the seed: item groups first, so items reach every split, then statement-only ones."""
    item_groups = sorted({r["group"] for r in out.items})
    split_of = split_groups(item_groups, rng)
    split_of.update(split_groups(sorted({s["group"] for s in out.statements} - set(item_groups)), rng))
    for row in (*out.items, *out.statements):
        row["split"] = split_of[row["group"]]


def read_dataset(
    dataset: str,
    source: str,
    records: list[RawRecord],
    opts: ReadOptions,
    parse: Callable[[dict], Parsed],
    id_field: str | None = None,
) -> Ingested:
    """Run `parse` over the (sampled) records: kept rows, or a reject per record, then seeded splits."""
    rng = random.Random(f"{dataset}:{opts.seed}")
    positions, note = sample_positions(len(records), rng, opts)
    out = Ingested(dataset=dataset, n_read=len(positions), note=note)
    seen: dict[str, int] = {}
    for i in positions:
        rec = records[i]
        try:
            key, item, statements = _check_one(dataset, rec, opts, parse, seen)
        except RecordReject as rej:
            record_id = _record_id(dataset, rec.value, id_field)
            out.rejects.append(reject_row(source, i, rec.value, rej.reason, rej.detail, record_id))
            continue
        seen[key] = i
        out.n_kept += 1
        out.items.extend([item] if item else [])
        out.statements.extend(statements)
    _assign_splits(out, rng)
    return out


def _check_one(
    dataset: str, rec: RawRecord, opts: ReadOptions, parse: Callable[[dict], Parsed], seen: dict[str, int]
) -> tuple[str, dict | None, list[dict]]:
    """(dedupe key, item row or None, statements) of one record, or RecordReject."""
    if rec.reject:
        raise RecordReject(*rec.reject)
    if not isinstance(rec.value, dict):
        raise RecordReject(NOT_AN_OBJECT, f"record is a {type(rec.value).__name__}, not a JSON object")
    if nesting(rec.value) > MAX_DEPTH:
        raise RecordReject(MALFORMED_JSON, f"record nested more than {MAX_DEPTH} levels deep")
    if has_surrogates(rec.value):
        raise RecordReject(UNDECODABLE, "a string of the record holds bytes that are not valid UTF-8")
    parsed = parse(rec.value)
    if parsed.item is None:
        key = parsed.source_id or content_hash("", "", [s["text"] for s in parsed.statements])
        item = None
    else:
        key, item = _finish_item(dataset, parsed, opts)
    if key in seen:
        what = "id" if parsed.source_id else "content"
        raise RecordReject(DUPLICATE_ID, f"same {what} as record {seen[key]}")
    return key, item, parsed.statements
