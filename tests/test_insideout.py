"""Inside-Out knowledge: K on hand-made rankings, the candidates, the external score against a plain forward pass,
the probe's logit, the tables' schemas and suites, and the stage end to end on the tiny model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from flows.stages import STAGES
from schemas.tables import INSIDEOUT_K, INSIDEOUT_LAYERS, INSIDEOUT_SCORES, ITEMS, STATEMENTS
from tasks.core.config import RunConfig
from tasks.core.quality import validate_tables
from tasks.core.storage import RunPaths, read_table, to_arrow, write_json
from tasks.insideout.candidates import build_candidates
from tasks.insideout.ranking import k_per_item, knowledge_k, summarise
from tasks.insideout.reporting import section_insideout
from tasks.probes.kinds.linear import LinearProbe

TABLES = ("insideout_scores", "insideout_k", "insideout_layers")


# ---------------------------------------------------------------- K by hand


def test_k_on_a_hand_made_ranking_with_a_tie():
    # correct 0.9 and 0.4; incorrect 0.4 (a tie), 0.1, 0.7. Pairs ranked correctly, by hand:
    # 0.9 beats 0.4, 0.1, 0.7 (3); 0.4 beats 0.1 only (the tie 0.4 = 0.4 is not "higher"), so 4 of 6.
    scores = [0.9, 0.4, 0.4, 0.1, 0.7]
    correct = [True, True, False, False, False]
    assert knowledge_k(scores, correct) == pytest.approx(4 / 6)
    assert knowledge_k([2.0, 1.0, 1.5], [True, False, False]) == 1.0  # every pair: K = 1
    assert knowledge_k([1.0, 1.0], [True, False]) == 0.0  # a lone tie ranks nothing
    assert knowledge_k([1.0, 2.0], [True, True]) is None  # no incorrect candidate: no pair, K undefined


def _score_rows(item: str, split: str, scores: list[float], correct: list[bool], scorer: str,
                layer: int | None) -> list[dict]:
    return [{"item_id": item, "split": split, "cand_idx": i, "answer": f"a{i}", "correct": c, "source": "relation",
             "n_tokens": 1, "scorer": scorer, "layer": layer, "score": s}
            for i, (s, c) in enumerate(zip(scores, correct))]


def test_k_per_item_and_the_summary_from_a_hand_made_table():
    correct = [True, True, False, False, False]
    rows = (_score_rows("i1", "test", [0.9, 0.4, 0.4, 0.1, 0.7], correct, "external", None)  # K 4/6
            + _score_rows("i1", "test", [5, 4, 3, 2, 1], correct, "internal", 3)  # K 1: hidden knowledge
            + _score_rows("i2", "test", [0.2, 0.1, 0.3, 0.4, 0.5], correct, "external", None)  # K 0
            + _score_rows("i2", "test", [0.2, 0.1, 0.3, 0.4, 0.5], correct, "internal", 3)  # K 0: none hidden
            + _score_rows("d1", "dev", [1, 0, 0, 0, 0], correct, "external", None)
            + _score_rows("d1", "dev", [1, 0, 0, 0, 0], correct, "internal", 3))
    scores = pl.DataFrame(rows, schema=pl.from_arrow(INSIDEOUT_SCORES.empty_table()).schema)
    k = k_per_item(scores)
    assert k.schema == pl.from_arrow(INSIDEOUT_K.empty_table()).schema
    got = {(r["item_id"], r["scorer"]): (r["k"], r["k_star"], r["layer"]) for r in k.iter_rows(named=True)}
    assert got[("i1", "external")] == (pytest.approx(4 / 6), False, None)
    assert got[("i1", "internal")] == (1.0, True, 3)
    assert got[("i2", "internal")] == (0.0, False, 3)
    # dev item d1: the correct 1 beats the three incorrect 0s, the correct 0 ties each of them: 3 of 6 pairs
    assert got[("d1", "external")][0] == pytest.approx(3 / 6)
    assert set(k["n_incorrect"]) == {3} and set(k["n_correct"]) == {2}

    summary = summarise(k, {3: 0.1}, n_boot=200, seed=0)
    assert summary.schema == pl.from_arrow(INSIDEOUT_LAYERS.empty_table()).schema
    test_int = summary.filter((pl.col("split") == "test") & (pl.col("scorer") == "internal")).row(0, named=True)
    test_ext = summary.filter((pl.col("split") == "test") & (pl.col("scorer") == "external")).row(0, named=True)
    assert test_ext["mean_k"] == pytest.approx((4 / 6 + 0) / 2) and test_ext["hidden_share"] is None
    assert test_int["mean_k"] == pytest.approx(0.5) and test_int["k_star"] == 0.5
    assert test_int["hidden_share"] == 0.5  # i1 only
    assert test_int["gap"] == pytest.approx(0.5 - 1 / 3)
    assert test_int["mean_k_lo"] <= test_int["mean_k"] <= test_int["mean_k_hi"]
    assert test_int["chosen"] and test_int["l2"] == 0.1 and not test_ext["chosen"]


# ---------------------------------------------------------------- candidates


def _items_and_statements() -> tuple[pl.DataFrame, pl.DataFrame]:
    base = {"dataset": "toy", "context": "c.", "relation_id": "P1"}
    items = [
        {**base, "item_id": "a", "split": "test", "group": "Ann", "question": "Where was Ann born?",
         "answers": ["Paris"], "orig_answers": ["Paris", "City of Light"], "counterfactual": False,
         "condition": "aligned"},
        {**base, "item_id": "b", "split": "train", "group": "Bob", "question": "Where was Bob born?",
         "answers": ["Rome"], "orig_answers": ["Oslo"], "counterfactual": True, "condition": "counterfactual"},
        *({**base, "item_id": f"x{i}", "split": "dev", "group": f"G{i}", "question": f"Where was G{i} born?",
           "answers": ["Rome"], "orig_answers": [city], "counterfactual": True, "condition": "counterfactual"}
          for i, city in enumerate(["Rome", "Lima", "paris", "Kyiv", "Cairo", "Quito"])),
        {**base, "item_id": "lone", "relation_id": "P2", "split": "test", "group": "Lone", "question": "q?",
         "answers": ["z"], "orig_answers": ["z"], "counterfactual": False},  # a relation with one object
    ]
    statements = [
        {"stmt_id": "s0", "key": "k0", "text": "Ann was born in Paris.", "label": 0, "group": "Ann",
         "relation_id": "P1", "split": "test"},
        {"stmt_id": "s1", "key": "k1", "text": "Ann was born in Kyiv.", "label": 1, "group": "Ann",
         "relation_id": "P1", "split": "test"},
    ]
    return pl.from_arrow(to_arrow(items, ITEMS)), pl.from_arrow(to_arrow(statements, STATEMENTS))


def test_candidates_correct_first_then_the_counterfactual_then_seeded_relation_objects():
    items, statements = _items_and_statements()
    cands = build_candidates(items, statements, n_incorrect=3, seed=0)
    a = cands.filter(pl.col("item_id") == "a").sort("cand_idx")
    assert a["answer"][:2].to_list() == ["Paris", "City of Light"] and a["correct"][:2].to_list() == [True, True]
    assert a["source"][:3].to_list() == ["true", "alias", "counterfactual"]
    assert a["answer"][2] == "Kyiv"  # named by Ann's false statement, not by her true one
    wrong = a.filter(~pl.col("correct"))["answer"].to_list()
    assert len(wrong) == 3 and "paris" not in wrong and len(set(wrong)) == 3  # "paris" spells a correct answer
    b = cands.filter(pl.col("item_id") == "b").sort("cand_idx")
    assert b["answer"][:2].to_list() == ["Oslo", "Rome"]  # a counterfactual item's context answer
    assert "lone" not in cands["item_id"].to_list()  # no incorrect candidate: no pair to rank
    again = build_candidates(items, statements, n_incorrect=3, seed=0)
    assert again.equals(cands)  # seeded
    other = build_candidates(items, statements, n_incorrect=3, seed=1)
    assert not other.equals(cands)  # the draws follow the seed


# ---------------------------------------------------------------- the forward pass, independently


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from tasks.core.config import ModelConfig
    from tasks.core.models import load_model, load_tokenizer

    mc = ModelConfig(name=tiny_model)
    return load_model(mc), load_tokenizer(mc)


def test_external_score_and_features_match_a_plain_forward_pass(tiny, one_thread):
    import torch

    from tasks.core.chat import render
    from tasks.evaluate.methods.closed_book import messages
    from tasks.insideout.forward import score_candidates

    model, tok = tiny
    prompts = [render(tok, messages(q)) for q in ("Where was Ann born?", "Who owns Beats Music?")]
    pairs = [(prompts[0], "Paris"), (prompts[0], "the City of Light"), (prompts[1], "Apple"),
             (prompts[1], "a company in Cupertino, California")]
    got = score_candidates(model, tok, [p for p, _ in pairs], [a for _, a in pairs], batch_size=3)
    n_layers = model.config.num_hidden_layers
    for i, (prompt, answer) in enumerate(pairs):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]  # a chat template holds its special tokens
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(torch.tensor([p_ids + a_ids]), output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0].double(), dim=-1)
        expected = np.mean([float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(a_ids)])
        assert got.logprob[i] == pytest.approx(expected, abs=1e-5)
        assert got.n_tokens[i] == len(a_ids)
        for layer in range(n_layers):
            ref = out.hidden_states[layer + 1][0, -1].numpy()
            np.testing.assert_allclose(got.features[layer][i], ref, atol=1e-5)


def test_an_answer_without_tokens_is_refused(tiny):
    from tasks.insideout.forward import score_candidates

    model, tok = tiny
    with pytest.raises(ValueError, match="tokenise to no token"):
        score_candidates(model, tok, ["Q"], [""])


def test_the_probe_logit_keeps_apart_what_the_probability_rounds_to_one():
    probe = LinearProbe(np.array([1.0]), 0.0)
    X = np.array([[60.0], [80.0]])
    assert probe.predict_proba(X)[0] == probe.predict_proba(X)[1] == 1.0  # a tie K would count as wrong
    from tasks.insideout.stage import probe_logit

    assert probe_logit(probe, X).tolist() == [60.0, 80.0]


# ---------------------------------------------------------------- the stage


def _cfg(tiny_model: str, runs_dir, enabled: bool) -> RunConfig:
    return RunConfig.model_validate({"run": "io", "runs_dir": str(runs_dir), "limit": 60,
                                     "model": {"name": tiny_model},
                                     "insideout": {"enabled": enabled, "bootstrap": 100, "batch_size": 8}})


@pytest.fixture(scope="module")
def insideout_run(tiny_model, tmp_path_factory):
    """Ingest, then the insideout stage through its declared config view, on the tiny model."""
    from tasks.ingest.stage import run_ingest
    from tasks.insideout.stage import run_insideout

    runs = tmp_path_factory.mktemp("insideout")
    cfg = _cfg(tiny_model, runs, enabled=True)
    paths = RunPaths(runs / "io")
    paths.root.mkdir(parents=True)
    run_ingest(cfg, paths)
    run_insideout(STAGES["insideout"].view(cfg), paths)
    return cfg, paths


def test_stage_tables_follow_their_schemas_and_pass_their_suites(insideout_run):
    _, paths = insideout_run
    for name, schema in zip(TABLES, (INSIDEOUT_SCORES, INSIDEOUT_K, INSIDEOUT_LAYERS)):
        frame = read_table(paths.table(name))
        assert frame.height > 0, name
        assert frame.schema == pl.from_arrow(schema.empty_table()).schema, name
    validate_tables(TABLES, paths)  # raises on any failed expectation


def test_stage_k_is_recomputed_from_its_own_scores_and_the_layer_is_chosen_on_dev(insideout_run):
    cfg, paths = insideout_run
    scores, k = read_table(paths.table("insideout_scores")), read_table(paths.table("insideout_k"))
    layers = read_table(paths.table("insideout_layers"))
    items = read_table(paths.table("items"))
    assert set(scores["split"]) == {"dev", "test"}  # train items only fit the probe
    assert set(scores.filter(pl.col("scorer") == "internal")["layer"]) == set(range(4))  # every layer of the model
    per_item = scores.filter(~pl.col("correct")).group_by("item_id", "scorer", "layer").len()
    assert per_item["len"].max() <= cfg.insideout.n_incorrect
    for (item_id, scorer, layer), part in list(scores.group_by("item_id", "scorer", "layer"))[:40]:
        row = k.filter((pl.col("item_id") == item_id) & (pl.col("scorer") == scorer)
                       & (pl.col("layer").eq_missing(layer)))
        assert row["k"][0] == pytest.approx(knowledge_k(part["score"].to_numpy(), part["correct"].to_numpy()))
    truth = dict(zip(items["item_id"], items["orig_answers"]))
    for r in scores.filter(pl.col("correct") & (pl.col("source") == "true")).iter_rows(named=True):
        assert r["answer"] == truth[r["item_id"]][0]
    dev = layers.filter((pl.col("split") == "dev") & (pl.col("scorer") == "internal"))
    best = dev.sort(["mean_k", "layer"], descending=[True, False])["layer"][0]
    assert layers.filter(pl.col("chosen"))["layer"].unique().to_list() == [best]
    n_test = k.filter((pl.col("split") == "test") & (pl.col("scorer") == "external")).height
    assert layers.filter((pl.col("split") == "test") & (pl.col("scorer") == "external"))["n_items"][0] == n_test


def test_stage_results_are_queryable_and_reported(insideout_run, tmp_path):
    from tasks.catalog.views import query
    from tasks.insideout.reporting import plot_insideout

    _, paths = insideout_run
    write_json({"run": "io"}, paths.manifest)
    cols, rows = query("select scorer, count(*) from insideout_layers where split = 'test' group by scorer"
                       " order by scorer", paths.root.parent)
    assert rows == [("external", 1), ("internal", 4)]
    layers = read_table(paths.table("insideout_layers"))
    text = section_insideout(layers)
    ext = layers.filter((pl.col("split") == "test") & (pl.col("scorer") == "external")).row(0, named=True)
    assert f"{ext['mean_k']:.3f} [{ext['mean_k_lo']:.3f}, {ext['mean_k_hi']:.3f}]" in text
    assert "(chosen on dev)" in text and "figures/insideout.png" in text
    fig = plot_insideout(layers)
    assert len(fig.axes) == 2


def test_stage_off_writes_empty_tables_that_pass_their_suites(tiny_model, tmp_path):
    from tasks.insideout.stage import run_insideout

    cfg = _cfg(tiny_model, tmp_path, enabled=False)
    paths = RunPaths(tmp_path / "io")
    run_insideout(STAGES["insideout"].view(cfg), paths)  # reads nothing, loads no model
    for name in TABLES:
        assert read_table(paths.table(name)).height == 0
    validate_tables(TABLES, paths)
    assert "Not computed in this run" in section_insideout(read_table(paths.table("insideout_layers")))


def test_off_by_default_and_in_no_preset():
    """Inside-Out costs minutes of forward passes: the default run and the full comparison leave it off."""
    from flows.presets import preset_config

    assert not RunConfig().insideout.enabled and not preset_config("full", {}).insideout.enabled


def test_a_k_star_that_disagrees_with_k_fails_its_suite(tmp_path):
    from tasks.core.quality import DataQualityError
    from tasks.core.storage import write_parquet

    paths = RunPaths(tmp_path / "bad")
    rows = [{"item_id": "i", "split": "test", "scorer": "external", "layer": None, "n_correct": 1, "n_incorrect": 2,
             "k": 0.5, "k_star": True}]
    write_parquet(rows, paths.table("insideout_k"), INSIDEOUT_K)
    with pytest.raises(DataQualityError, match="insideout_k"):
        validate_tables(["insideout_k"], paths)
