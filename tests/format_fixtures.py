"""Small files in each published benchmark format, good and broken, written into a test's tmp dir.

Every writer is `write_<dataset>(dir, broken=False) -> Path` (the path to pass as --data-path). A good file
holds eight well-formed records over eight questions (so every split gets some); a broken one holds the
same good records plus records that each trigger one reject reason (BROKEN_REASONS lists what each broken
file yields, for a reader given a whitespace token counter and a budget of LONG_BUDGET tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.rejects import EMPTY_CONTEXT, EMPTY_QUESTION
from tasks.ingest.formats import Reader, file_reader
from tasks.ingest.formats.fields import get_answers, get_text
from tasks.ingest.formats.items import Parsed, conflict_item

LONG_BUDGET = 200  # tokens (whitespace words): every good context fits, the long one does not
BAD_BYTES = b"\xff\xfe"  # never valid UTF-8
_BAD_MARK = "@@INVALID_UTF8@@"

# (question, original answer + aliases, counterfactual answer + aliases, sentence template, intro, outro)
FACTS = [
    ("Who wrote the novel Middlemarch?", ["George Eliot", "Mary Ann Evans"], ["Charlotte Bronte", "Currer Bell"],
     "The novel was written by {}.", "Middlemarch was first published in eight instalments.",
     "It is set in a fictional Midlands town."),
    ("What is the capital of Australia?", ["Canberra"], ["Melbourne"],
     "The capital of Australia is {}.", "Australia is a federation of six states.",
     "The federal parliament meets in the capital."),
    ("Which element has the chemical symbol Fe?", ["Iron"], ["Copper", "Cu metal"],
     "The symbol Fe stands for {}.", "Chemical symbols often come from Latin names.",
     "The metal is used widely in construction."),
    ("In which city is the Eiffel Tower located?", ["Paris"], ["Lyon"],
     "The Eiffel Tower stands in {}.", "The Eiffel Tower was completed in 1889.",
     "It was built for a world's fair."),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "Leonardo"], ["Raphael", "Raffaello Sanzio"],
     "The Mona Lisa was painted by {}.", "The Mona Lisa hangs in the Louvre.",
     "It is one of the most visited paintings in the world."),
    ("What is the largest planet in the Solar System?", ["Jupiter"], ["Saturn"],
     "The largest planet in the Solar System is {}.", "The Solar System has eight planets.",
     "Gas giants have no solid surface."),
    ("Which river flows through Cairo?", ["Nile", "River Nile"], ["Euphrates"],
     "The river that flows through Cairo is the {}.", "Cairo is the capital of Egypt.",
     "The city lies near the head of a delta."),
    ("Who developed the theory of general relativity?", ["Albert Einstein", "Einstein"], ["Niels Bohr", "Bohr"],
     "General relativity was developed by {}.", "General relativity was published in 1915.",
     "It describes gravity as the curvature of spacetime."),
]
LONG_CONTEXT = " ".join(f"Sentence number {i} of a very long context says little." for i in range(40))


def context_of(fact: tuple, answer: str) -> str:
    """The three-sentence context of a fact stating `answer`."""
    _, _, _, template, intro, outro = fact
    return f"{intro} {template.format(answer)} {outro}"


def target_of(fact: tuple) -> str:
    """The context sentence carrying the counterfactual answer."""
    return fact[3].format(fact[2][0])


def _write_json(path: Path, data: object) -> Path:
    """JSON text; the marker string becomes bytes that are not UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, ensure_ascii=False, indent=1)
    path.write_bytes(text.encode("utf-8").replace(_BAD_MARK.encode(), BAD_BYTES))
    return path


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    """One JSON value per line; str entries starting with '!' are written raw (malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for rec in lines:
        raw = rec[1:] if isinstance(rec, str) and rec.startswith("!") else json.dumps(rec, ensure_ascii=False)
        out.append(raw.encode("utf-8").replace(_BAD_MARK.encode(), BAD_BYTES))
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    """Rows as a Parquet file (types inferred, as HF's converter would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------------------------- ConFiQA


def confiqa_record(fact: tuple, kind: str = "QA") -> dict:
    """One ConFiQA record with every published field (triples/paths as Python-literal strings)."""
    question, orig, cf = fact[0], fact[1], fact[2]
    rec = {
        "orig_triple": f"('{question[:-1]}', 'answer', '{orig[0]}')",
        "cf_triple": f"('{question[:-1]}', 'answer', '{cf[0]}')",
        "question": question,
        "orig_answer": orig[0],
        "cf_answer": cf[0],
        "orig_alias": orig[1:],
        "cf_alias": cf[1:],
        "orig_context": context_of(fact, orig[0]),
        "cf_context": context_of(fact, cf[0]),
        "orig_context_piece": fact[3].format(orig[0]),
        "cf_context_piece": target_of(fact),
        "orig_path": f"[('{question[:-1]}', '{orig[0]}')]",
        "cf_path": f"[('{question[:-1]}', '{cf[0]}')]",
        "orig_path_labeled": f"[('{question[:-1]}', 'answer', '{orig[0]}')]",
        "cf_path_labeled": f"[('{question[:-1]}', 'answer', '{cf[0]}')]",
    }
    if kind == "MC":
        rec["orig"] = {"question": question, "answer": orig[0]}
    return rec


def _confiqa_broken(kind: str) -> list:
    """Records of a broken ConFiQA file, one reject reason each after the good ones."""
    good = [confiqa_record(f, kind) for f in FACTS]
    base = good[0]
    no_answer = {k: v for k, v in base.items() if k != "cf_answer"}
    return good + [
        {**no_answer, "question": "Missing answer?"},  # missing_field
        {**base, "question": "Typed answer?", "cf_answer": 42},  # wrong_type
        {**base, "question": "   "},  # empty_question
        {**base, "question": "Empty context?", "cf_context": ""},  # empty_context
        {**base, "question": "Empty answer?", "cf_answer": " "},  # empty_answers
        dict(base),  # duplicate_id (same content as record 0)
        {**base, "question": "Same answer?", "cf_answer": "the george eliot"},  # same_answer
        "just a string",  # not_an_object
        {**base, "question": "Bad bytes?", "cf_context": f"Broken {_BAD_MARK} text. Charlotte Bronte."},  # undecodable
        {**base, "question": "Long context?", "cf_context": LONG_CONTEXT},  # context_too_long
    ]


def _write_confiqa(dir: Path, kind: str, broken: bool) -> Path:
    """ConFiQA-<kind>.json, a JSON list as published."""
    records = _confiqa_broken(kind) if broken else [confiqa_record(f, kind) for f in FACTS]
    return _write_json(Path(dir) / f"ConFiQA-{kind}{'-broken' if broken else ''}.json", records)


def write_confiqa_qa(dir: Path, broken: bool = False) -> Path:
    return _write_confiqa(dir, "QA", broken)


def write_confiqa_mr(dir: Path, broken: bool = False) -> Path:
    return _write_confiqa(dir, "MR", broken)


def write_confiqa_mc(dir: Path, broken: bool = False) -> Path:
    return _write_confiqa(dir, "MC", broken)


# -------------------------------------------------------------------------------------------- FaithEval


def faitheval_cf_record(i: int, fact: tuple) -> dict:
    """A counterfactual-subset row: four choices, the counterfactual answer under label B."""
    texts = [fact[1][0], fact[2][0], "None of the above", "Unknown entity"]
    rec = {
        "id": f"fe-cf-{i}",
        "context": context_of(fact, fact[2][0]),
        "question": fact[0],
        "choices": {"label": ["A", "B", "C", "D"], "text": texts},
        "answerKey": "B",
        "answer": fact[2][0],
    }
    if i == 1:
        rec["answer"] = "B"  # the answer given as a label
    if i == 2:
        rec["answer"] = None  # only the answer key
    return rec


def faitheval_qid_record(i: int, fact: tuple, subset: str) -> dict:
    """An unanswerable / inconsistent row: qid, context, question and the source dataset's answers."""
    if subset == "unanswerable":
        context = f"{fact[4]} {fact[5]}"  # the answer sentence removed
    else:
        context = f"{context_of(fact, fact[1][0])} {fact[3].format(fact[2][0])}"  # two answers
    return {"qid": f"fe-{subset[:2]}-{i}", "context": context, "question": fact[0], "answers": list(fact[1])}


def _faitheval_broken(subset: str) -> list:
    """Lines of a broken FaithEval JSONL file (good rows first)."""
    if subset == "counterfactual":
        good = [faitheval_cf_record(i, f) for i, f in enumerate(FACTS)]
        base = good[0]
        return good + [
            {**base, "id": "fe-cf-x1", "answerKey": "Z", "answer": None},  # empty_answers
            {**base, "id": "fe-cf-x2", "choices": ["A", "B"]},  # wrong_type
            dict(base),  # duplicate_id
            {k: v for k, v in base.items() if k != "context"} | {"id": "fe-cf-x3"},  # missing_field
            "!{\"id\": \"fe-cf-x4\", \"question\": ",  # malformed_json
            {**base, "id": "fe-cf-x5", "question": f"Bad {_BAD_MARK} bytes?"},  # undecodable (line parses)
            [1, 2, 3],  # not_an_object
        ]
    good = [faitheval_qid_record(i, f, subset) for i, f in enumerate(FACTS)]
    base = good[0]
    return good + [
        {k: v for k, v in base.items() if k != "qid"},  # missing_field
        {**base, "qid": "fe-x1", "question": ""},  # empty_question
        {**base, "qid": "fe-x2", "context": "  "},  # empty_context
        {**base, "qid": "fe-x3", "answers": {"text": "Canberra"}},  # wrong_type
        dict(base),  # duplicate_id
        "!not json at all",  # malformed_json
        {**base, "qid": "fe-x4", "context": LONG_CONTEXT},  # context_too_long
    ]


def _write_faitheval(dir: Path, subset: str, broken: bool) -> Path:
    """FaithEval-<subset>: Parquet as published; the broken file as JSON Lines (Parquet cannot hold bad rows)."""
    if broken:
        return _write_jsonl(Path(dir) / f"FaithEval-{subset}-broken.jsonl", _faitheval_broken(subset))
    if subset == "counterfactual":
        rows = [faitheval_cf_record(i, f) for i, f in enumerate(FACTS)]
    else:
        rows = [faitheval_qid_record(i, f, subset) for i, f in enumerate(FACTS)]
    return _write_parquet(Path(dir) / f"FaithEval-{subset}.parquet", rows)


def write_faitheval_counterfactual(dir: Path, broken: bool = False) -> Path:
    return _write_faitheval(dir, "counterfactual", broken)


def write_faitheval_unanswerable(dir: Path, broken: bool = False) -> Path:
    return _write_faitheval(dir, "unanswerable", broken)


def write_faitheval_inconsistent(dir: Path, broken: bool = False) -> Path:
    return _write_faitheval(dir, "inconsistent", broken)


# ---------------------------------------------------------------------------------------------- NQ-Swap


def nq_swap_record(fact: tuple) -> dict:
    """An NQ-Swap row: original and substituted context and answer lists."""
    return {
        "question": fact[0],
        "org_context": context_of(fact, fact[1][0]),
        "org_answer": list(fact[1]),
        "sub_context": context_of(fact, fact[2][0]),
        "sub_answer": list(fact[2]),
    }


def write_nq_swap(dir: Path, broken: bool = False) -> Path:
    """NQ-Swap as Parquet (HF); the broken one as a JSON list."""
    good = [nq_swap_record(f) for f in FACTS]
    if not broken:
        return _write_parquet(Path(dir) / "nq_swap.parquet", good)
    base = good[0]
    records = good + [
        {**base, "question": "Same?", "sub_answer": ["George  Eliot!"]},  # same_answer
        {**base, "question": "Typed?", "sub_answer": {"text": "x"}},  # wrong_type
        {**base, "question": "Empty?", "sub_answer": []},  # empty_answers
        {**base, "question": "Lone \ud83d surrogate?"},  # undecodable (escaped lone surrogate)
        {k: v for k, v in base.items() if k != "org_answer"} | {"question": "Missing?"},  # missing_field
    ]
    path = Path(dir) / "nq_swap-broken.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=True), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- Zhou et al.


def zhou_pair(fact: tuple, i: int) -> tuple[dict, dict]:
    """(orig, conflict) records of one question; odd positions give the answer as a list."""
    orig = {"question": fact[0], "context": context_of(fact, fact[1][0]), "answer": fact[1][0]}
    conflict = {"question": fact[0], "context": context_of(fact, fact[2][0]), "answer": fact[2][0]}
    if i % 2:
        orig["answer"], conflict["answer"] = list(fact[1]), list(fact[2])
    return orig, conflict


def write_zhou_nq(dir: Path, broken: bool = False) -> Path:
    """A directory holding orig_dev_filtered.json and conflict_dev_filtered.json (aligned JSON lists)."""
    root = Path(dir) / ("zhou-broken" if broken else "zhou")
    root.mkdir(parents=True, exist_ok=True)
    pairs = [zhou_pair(f, i) for i, f in enumerate(FACTS)]
    orig, conflict = [p[0] for p in pairs], [p[1] for p in pairs]
    if broken:
        o, c = zhou_pair(FACTS[0], 0)
        orig += [o, "not an object", {**o, "answer": ["George Eliot"]}]
        conflict += [{**c, "question": "A different question?"}, c, {**c, "answer": "george eliot"}]
        conflict.append(c)  # the conflict file is one record longer: misaligned
        # -> misaligned (question differs), not_an_object (orig side), same_answer, misaligned (no orig record)
    _write_json(root / "orig_dev_filtered.json", orig)
    _write_json(root / "conflict_dev_filtered.json", conflict)
    return root


# ------------------------------------------------------------------------------------------------ SQuAD


def squad_nested(facts: list[tuple]) -> dict:
    """Official SQuAD v1.1 JSON: two articles of paragraphs with their questions (original answers)."""
    data = []
    for a, chunk in enumerate((facts[:4], facts[4:])):
        paragraphs = []
        for j, fact in enumerate(chunk):
            answer = fact[1][0]
            context = context_of(fact, answer)
            qas = [{"id": f"sq-{a}-{j}", "question": fact[0],
                    "answers": [{"text": answer, "answer_start": context.index(answer)}]}]
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"Article {a}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


def squad_hf_rows(facts: list[tuple]) -> list[dict]:
    """HF `rajpurkar/squad` rows: answers as {text: [...], answer_start: [...]}."""
    rows = []
    for i, fact in enumerate(facts):
        context = context_of(fact, fact[1][0])
        texts = list(fact[1])
        starts = [context.find(t) for t in texts]
        rows.append({"id": f"sq-hf-{i}", "title": "T", "context": context, "question": fact[0],
                     "answers": {"text": texts, "answer_start": starts}})
    return rows


def write_squad(dir: Path, broken: bool = False, layout: str = "nested") -> Path:
    """SQuAD as the official nested JSON (default), HF Parquet rows ("hf") or JSONL with answer strings ("strings")."""
    if broken:
        doc = squad_nested(FACTS)
        paragraphs = doc["data"][0]["paragraphs"]
        qa = paragraphs[0]["qas"][0]
        paragraphs[0]["qas"] += [
            {**qa, "id": "sq-x1", "answers": []},  # empty_answers (a v2 unanswerable question)
            dict(qa),  # duplicate_id
            {"id": "sq-x2", "answers": qa["answers"]},  # missing_field (no question)
            {**qa, "id": "sq-x3", "question": ["not", "a", "string"]},  # wrong_type
        ]
        paragraphs.append({"context": LONG_CONTEXT, "qas": [{**qa, "id": "sq-x4"}]})  # context_too_long
        return _write_json(Path(dir) / "squad-broken.json", doc)
    if layout == "hf":
        return _write_parquet(Path(dir) / "squad.parquet", squad_hf_rows(FACTS))
    if layout == "strings":
        rows = [{**r, "answers": r["answers"]["text"]} for r in squad_hf_rows(FACTS)]
        return _write_jsonl(Path(dir) / "squad.jsonl", rows)
    return _write_json(Path(dir) / "dev-v1.1.json", squad_nested(FACTS))


# ---------------------------------------------------------------------------------------------- MQuAKE

MQUAKE_EDITS = [
    # (subject, prompt, true object, new object, question)
    ("Ellie Kemper", "{} is a citizen of", "United States of America", "Croatia", ""),
    ("Croatia", "The capital of {} is", "Zagreb", "Split", ""),
    ("Danielle Darrieux", "The mother tongue of {} is", "French", "English",
     "What is Danielle Darrieux's mother tongue?"),
    ("Toko Yasuda", "The instrument {} plays is", "guitar", "piano", "Which instrument does Toko Yasuda play?"),
    ("Autonomous University of Madrid", "{} is located in the country of", "Spain", "Sweden",
     "In which country is the Autonomous University of Madrid?"),
    ("Apple A5", "{} was created by", "Apple", "Google", "Who created the Apple A5?"),
    ("Percy Snow", "The sport {} plays is", "American football", "ice hockey", "Which sport does Percy Snow play?"),
    ("Thomas Joannes Stieltjes", "The native language of {} is", "Dutch", "German", ""),
]


def _rewrite(edit: tuple) -> dict:
    subject, prompt, true, new, _ = edit
    return {"prompt": prompt, "subject": subject, "relation_id": "P0",
            "target_true": {"str": true, "id": "Q1"}, "target_new": {"str": new, "id": "Q2"},
            "question": prompt.format(subject) + "?"}


def mquake_records() -> list[dict]:
    """MQuAKE-CF records: one two-hop case, single-edit cases with questions, one case with no questions."""
    records = [
        {"case_id": 1, "requested_rewrite": [_rewrite(MQUAKE_EDITS[0]), _rewrite(MQUAKE_EDITS[1])],
         "questions": ["What is the capital of the country of citizenship of Ellie Kemper?",
                       "Which city is the capital of the country Ellie Kemper is a citizen of?"],
         "answer": "Washington, D.C.", "answer_alias": ["Washington"], "new_answer": "Split",
         "new_answer_alias": ["Spalato"]},
    ]
    for i, edit in enumerate(MQUAKE_EDITS[2:], start=2):
        records.append({"case_id": i, "requested_rewrite": [_rewrite(edit)],
                        "questions": [edit[4]],
                        "answer": edit[2], "answer_alias": [], "new_answer": edit[3], "new_answer_alias": []})
    del records[-1]["questions"]  # edits only: statements, no item
    return records


def write_mquake(dir: Path, broken: bool = False) -> Path:
    """MQuAKE-CF-3k-v2.json, a JSON list as published."""
    records = mquake_records()
    if broken:
        base = records[1]
        rw = base["requested_rewrite"][0]
        records += [
            {k: v for k, v in base.items() if k != "requested_rewrite"} | {"case_id": 101},  # missing_field
            {**base, "case_id": 102, "requested_rewrite": [{**rw, "prompt": "no slot here"}]},  # unformable_sentence
            {**base, "case_id": 103, "requested_rewrite": [{**rw, "target_new": {"str": "the French"}}]},  # same_answer
            dict(base),  # duplicate_id (case_id 2 again)
            {**base, "case_id": 104, "requested_rewrite": "not a list"},  # wrong_type
            {**base, "case_id": 105, "questions": [" "]},  # empty_question
        ]
    return _write_json(Path(dir) / f"MQuAKE-CF-3k-v2{'-broken' if broken else ''}.json", records)


# ------------------------------------------------------------------------------------------ known facts


def known_fact(kid: int, subject: str, obj: str, rel: str = "P19") -> dict:
    """A record of data/known_facts.json's shape."""
    template = {"P19": "{} was born in", "P36": "The capital of {} is", "P27": "{} is a citizen of"}.get(rel, "{} is")
    return {"known_id": kid, "subject": subject, "attribute": obj, "template": template,
            "prediction": "", "prompt": template.format(subject), "relation_id": rel}


KNOWN = [
    (1, "Eavan Boland", "Dublin", "P19"), (2, "Henri Debain", "Paris", "P19"),
    (3, "Emilia Rydberg", "Stockholm", "P19"), (4, "Nicolas Gigault", "Rouen", "P19"),
    (5, "Norway", "Oslo", "P36"), (6, "Finland", "Helsinki", "P36"),
    (7, "Kenya", "Nairobi", "P36"), (8, "Greta Garbo", "Sweden", "P27"), (9, "Edith Piaf", "France", "P27"),
]


def write_known_facts(dir: Path, broken: bool = False) -> Path:
    """A small known-facts file; the broken one adds every known-facts reject reason."""
    records: list = [known_fact(*k) for k in KNOWN]
    if broken:
        records += [
            {k: v for k, v in known_fact(20, "Anna Lindh", "Stockholm").items() if k != "attribute"},  # missing_field
            known_fact(21, "Olof Palme", "Stockholm", rel="P9999"),  # unknown_relation
            known_fact(22, "Eavan Boland", "Cork"),  # duplicate
            known_fact(23, "  ", "Rome"),  # empty_field
            {**known_fact(24, "Ingrid Bergman", "Stockholm"), "subject": 42},  # wrong_type
            known_fact(25, "Iron Man", "Avengers", rel="P463"),  # no_counterfactual
            known_fact(26, "Bad {subject}", "Oslo"),  # unformable_sentence
            "not a record",  # not_an_object
            known_fact(3, "Astrid Lindgren", "Vimmerby"),  # duplicate_id
        ]
    return _write_json(Path(dir) / f"known_facts{'-broken' if broken else ''}.json", records)


# ---------------------------------------------------------------------------------------- not the format


def write_not_the_format(dir: Path) -> Path:
    """A .json file that is CSV text: no reader may treat it record by record."""
    path = Path(dir) / "not_the_format.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("name,age\nAda Lovelace,36\nAlan Turing,41\n", encoding="utf-8")
    return path


# ------------------------------------------------------ a throwaway dataset: all a new reader module declares

TOY = "toy-qa"


def parse_toy(rec: dict) -> Parsed:
    """One record of a made-up QA format: question `q`, context `passage`, answers `new`, memorised `old`."""
    question, context = get_text(rec, "q", EMPTY_QUESTION), get_text(rec, "passage", EMPTY_CONTEXT)
    return conflict_item(question, context, get_answers(rec, "new"), get_answers(rec, "old"), None)


def toy_reader(**options) -> Reader:
    """The made-up format's Reader, as its module would declare it (not registered: a test registers it)."""
    return file_reader(TOY, "A made-up QA format (tests only).", "tests/format_fixtures.py", ("q", "passage"),
                       parse_toy, "1", **options)


def write_toy(dir: Path, broken: bool = False) -> Path:
    """Eight good toy records as JSON Lines; broken adds a same-answer record and a non-object."""
    rows: list = [{"q": f[0], "passage": context_of(f, f[2][0]), "new": f[2], "old": f[1]} for f in FACTS]
    if broken:
        rows += [{**rows[0], "q": "Who wrote it?", "new": "George Eliot"}, [1]]
    return _write_jsonl(Path(dir) / "toy.jsonl", rows)


_QA = ("missing_field", "wrong_type", "empty_question", "empty_context", "empty_answers", "duplicate_id")
_FE_QID = ("missing_field", "empty_question", "empty_context", "wrong_type", "duplicate_id", "malformed_json",
           "context_too_long")
# What each broken file yields (reason -> count) under a whitespace counter and a LONG_BUDGET budget.
BROKEN_REASONS: dict[str, dict[str, int]] = {
    "known-facts": dict.fromkeys(
        ("missing_field", "unknown_relation", "duplicate", "empty_field", "wrong_type", "no_counterfactual",
         "unformable_sentence", "not_an_object", "duplicate_id"), 1),
    **{
        f"confiqa-{k}": dict.fromkeys((*_QA, "same_answer", "not_an_object", "undecodable", "context_too_long"), 1)
        for k in ("qa", "mr", "mc")
    },
    "faitheval-counterfactual": dict.fromkeys(
        ("empty_answers", "wrong_type", "duplicate_id", "missing_field", "malformed_json", "undecodable",
         "not_an_object"), 1),
    "faitheval-unanswerable": dict.fromkeys(_FE_QID, 1),
    "faitheval-inconsistent": dict.fromkeys(_FE_QID, 1),
    "nq-swap": dict.fromkeys(("same_answer", "wrong_type", "empty_answers", "undecodable", "missing_field"), 1),
    "zhou-nq": {"misaligned": 2, "not_an_object": 1, "same_answer": 1},
    "squad": dict.fromkeys(("empty_answers", "duplicate_id", "missing_field", "wrong_type", "context_too_long"), 1),
    "mquake": dict.fromkeys(
        ("missing_field", "unformable_sentence", "same_answer", "duplicate_id", "wrong_type", "empty_question"), 1),
}  # fmt: skip


WRITERS = {
    "known-facts": write_known_facts,
    "confiqa-qa": write_confiqa_qa,
    "confiqa-mr": write_confiqa_mr,
    "confiqa-mc": write_confiqa_mc,
    "faitheval-counterfactual": write_faitheval_counterfactual,
    "faitheval-unanswerable": write_faitheval_unanswerable,
    "faitheval-inconsistent": write_faitheval_inconsistent,
    "nq-swap": write_nq_swap,
    "zhou-nq": write_zhou_nq,
    "squad": write_squad,
    "mquake": write_mquake,
}
