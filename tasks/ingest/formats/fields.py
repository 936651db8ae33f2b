"""Getting one field of a record, or the RecordReject that says why the record cannot be used.

Every getter raises RecordReject with a reason of schemas/rejects.py; the read loop turns it into a `rejects`
row, so a reader's parse function is a plain sequence of getters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from schemas.rejects import EMPTY_ANSWERS, EMPTY_FIELD, MISSING_FIELD, SAME_ANSWER, WRONG_TYPE
from tasks.core.text import normalize, visible


class RecordReject(Exception):
    """Raised while checking one record: it goes to `rejects` with this reason and detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def get_field(rec: dict, name: str) -> Any:
    """A required field (missing or null: missing_field)."""
    if rec.get(name) is None:
        raise RecordReject(MISSING_FIELD, f"field {name!r} is missing")
    return rec[name]


def get_id(rec: dict, name: str) -> str:
    """A required record id (string or integer), as a string."""
    value = get_field(rec, name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a string or integer")
    if not str(value).strip():
        raise RecordReject(MISSING_FIELD, f"field {name!r} is empty")
    return str(value).strip()


def get_text(rec: dict, name: str, empty_reason: str = EMPTY_FIELD) -> str:
    """A required, non-blank string field, stripped."""
    value = get_field(rec, name)
    if not isinstance(value, str):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a string")
    if not visible(value).strip():
        invisible = " (only invisible characters)" if value.strip() else ""
        raise RecordReject(empty_reason, f"field {name!r} is empty{invisible}")
    return value.strip()


def _dedupe(values: Iterable[str]) -> list[str]:
    """Stripped, non-empty values in first-seen order without repeats."""
    out: list[str] = []
    for v in values:
        v = v.strip()
        if visible(v).strip() and v not in out:
            out.append(v)
    return out


def get_answers(rec: dict, name: str, *, allow_empty: bool = False) -> list[str]:
    """An answer field given as a string or a list of strings, as a de-duplicated list."""
    value = get_field(rec, name)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a string or list of strings")
    answers = _dedupe(value)
    if not answers and not allow_empty:
        raise RecordReject(EMPTY_ANSWERS, f"field {name!r} holds no non-empty answer")
    return answers


def get_aliases(rec: dict, name: str) -> list[str]:
    """An optional list of alias strings (absent or null: none)."""
    value = rec.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecordReject(WRONG_TYPE, f"field {name!r} is a {type(value).__name__}, not a list of strings")
    return list(value)


def with_aliases(main: str, aliases: Iterable[str]) -> list[str]:
    """The answer followed by its aliases, de-duplicated: what scoring accepts."""
    return _dedupe([main, *aliases])


def check_same_answer(answers: list[str], orig_answers: list[str] | None, what: str = "answer") -> None:
    """Reject a counterfactual whose answer equals the original after SQuAD normalisation."""
    if orig_answers and normalize(answers[0]) == normalize(orig_answers[0]):
        raise RecordReject(SAME_ANSWER, f"counterfactual {what} {answers[0]!r} equals the original {orig_answers[0]!r}")
