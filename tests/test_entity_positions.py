"""subject_last: the subject's last token found from tokenizer offsets, stored states equal to a plain forward pass,
and the layer-curve comparison with `last` on the same statements."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from schemas.layout import analysis_path
from schemas.tables import ITEMS, SENTENCES, STATEMENTS
from tasks.activations.stage import extract, run_activations
from tasks.activations.subject import subject_span, subject_token
from tasks.core.activation_store import ActivationStore
from tasks.core.config import ModelConfig, RunConfig
from tasks.core.models import load_model, load_tokenizer
from tasks.core.storage import RunPaths, model_slug, read_table, text_key, write_parquet

# (statement, subject): the subject first, in the middle, after a comma, lower-case in the data but capitalised
# at the sentence start, and several words long
CASES = [
    ("Paris is the capital of France.", "Paris"),
    ("The capital of France is Paris.", "France"),
    ("Beats Music is owned by Apple.", "Beats Music"),
    ("In Toko Yasuda, the official language is Japanese.", "Toko Yasuda"),
    ("Samurai cinema is associated with the genre of film.", "samurai cinema"),
    ("The native language of Vladimir Putin is Russian.", "Vladimir Putin"),
]


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    cfg = ModelConfig(name=tiny_model)
    return load_model(cfg), load_tokenizer(cfg)


def prefix_last_token(tok, text: str, end: int) -> int:
    """Independent route: the subject's last token is the last token of the text cut right after the subject."""
    return len(tok(text[:end], add_special_tokens=True)["input_ids"]) - 1


def test_subject_token_is_the_subjects_last_token(model_tok):
    _, tok = model_tok
    for text, subject in CASES:
        start, end = subject_span(text, subject)
        assert text[start:end].casefold() == subject.casefold()
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        idx = subject_token(enc["offset_mapping"], start, end)
        assert idx == prefix_last_token(tok, text, end), text
        piece = tok.decode([enc["input_ids"][idx]]).strip()
        assert piece and subject.casefold().endswith(piece.casefold()), (text, piece)
    assert subject_span("Paris is the capital of France.", "London") is None
    assert subject_span("Apple Music is owned by Apple.", "Apple") == (0, 5)  # the first mention: the subject's


def write_statements(paths: RunPaths, pairs: list[tuple[str, str, str]]) -> pl.DataFrame:
    """statements (text, label 0/1 alternating, group = subject), one item and its sentence for the stage."""
    rows = [{"stmt_id": f"s{i}", "key": text_key(t), "text": t, "label": i % 2, "group": g, "split": split}
            for i, (t, g, split) in enumerate(pairs)]
    write_parquet(rows, paths.table("statements"), STATEMENTS)
    context = "An unrelated sentence about the weather."
    write_parquet([{"item_id": "i0", "dataset": "x", "split": "test", "group": "g", "question": "Q?",
                    "context": context, "answers": ["a"], "counterfactual": True}], paths.table("items"), ITEMS)
    write_parquet([{"item_id": "i0", "sent_idx": 0, "key": text_key(context), "text": context, "char_start": 0,
                    "char_end": len(context), "unit": "sentence", "source_idx": 0}], paths.table("sentences"), SENTENCES)
    return pl.DataFrame(rows)


def with_positions(cfg: RunConfig, **update) -> RunConfig:
    act = {"positions": ["last", "subject_last"], **update}
    return cfg.model_copy(update={"activations": cfg.activations.model_copy(update=act)})


def test_stored_subject_last_equals_a_plain_forward_pass(tiny_cfg, run_paths, model_tok):
    model, tok = model_tok
    pairs = [(text, subject, "train") for text, subject in CASES]
    pairs += [("The capital of France is Lyon.", "France", "train"),  # shares its prefix with CASES[1]
              ("Nobody is named here.", "Marie Curie", "train")]  # subject absent: no subject_last row
    write_statements(run_paths, pairs)
    cfg = with_positions(tiny_cfg, layers=[0, 2, 3], batch_size=3, shard_rows=4)  # several shards and batches
    run_activations(cfg, run_paths)
    store = ActivationStore.open(run_paths.activations, model_slug(cfg.model.name))
    assert store.rows_by_position == {"last": len(pairs) + 1, "subject_last": len(pairs) - 1}
    found = pairs[:-1]
    keys = [text_key(t) for t, _, _ in found]
    fed = [t.rstrip().rstrip(".") for t, _, _ in found]  # what the model reads: the text without its period
    with torch.inference_mode():
        hidden = [model(**tok(f, return_tensors="pt"), output_hidden_states=True).hidden_states for f in fed]
    for layer in (0, 2, 3):
        got = store.vectors(layer, keys, "subject_last")
        ref = np.stack([h[layer + 1][0, prefix_last_token(tok, f, subject_span(f, g)[1])].numpy()
                        for h, f, (_, g, _) in zip(hidden, fed, found)])
        assert np.abs(got - ref).max() <= 1e-5, layer
        last = extract(model, tok, fed, layers=[layer], batch_size=1)[layer]  # 'last' rows as without the position
        assert np.abs(store.vectors(layer, keys, "last") - last).max() <= 1e-5
        # causal: a statement's state at its subject has not seen the object (CASES[1] and the Lyon one share it)
        assert np.abs(got[1] - got[len(CASES)]).max() <= 1e-5
    with pytest.raises(KeyError, match="no activation"):
        store.vectors(0, [text_key(pairs[-1][0])], "subject_last")


def test_no_statement_with_its_subject_is_a_clear_error(tiny_cfg, run_paths):
    write_statements(run_paths, [("Nobody is named here.", "Marie Curie", "train")])
    with pytest.raises(ValueError, match="no statement contains its subject"):
        run_activations(with_positions(tiny_cfg, layers=[0]), run_paths)


@pytest.fixture(scope="module")
def kf_run(tiny_model, tmp_path_factory):
    """A tiny known-facts run (60 facts) with subject_last extracted: ingest, units, activations."""
    from flows.runner import start_manifest
    from flows.stages import STAGES

    cfg = RunConfig.model_validate({"run": "kf", "runs_dir": str(tmp_path_factory.mktemp("runs")), "limit": 60,
                                    "model": {"name": tiny_model},
                                    "activations": {"positions": ["last", "subject_last"]}})
    paths = RunPaths(cfg.runs_dir / "kf")
    paths.root.mkdir(parents=True)
    for name in ("ingest", "decompose", "activations"):
        STAGES[name].function()(STAGES[name].view(cfg), paths)
    start_manifest(cfg, paths)  # the recorded config the command reads
    return cfg, paths


def test_positions_compared_on_the_same_statements(kf_run):
    from tasks.probes.entity_positions import compare_positions

    cfg, paths = kf_run
    statements = read_table(paths.table("statements"))
    store = ActivationStore.open(paths.activations, model_slug(cfg.model.name))
    assert store.rows_by_position["subject_last"] == statements.height  # every known-facts statement names its subject
    table = compare_positions(cfg, paths)
    assert read_table(analysis_path(paths.root, "entity_positions")).height == table.height
    assert analysis_path(paths.root, "entity_positions_figure").stat().st_size > 0
    per = table.group_by("layer", "probe", "position", "split").len()
    assert per["len"].max() == 1 and per.height == len(store.layers) * 2 * 2 * 3  # layers x kinds x positions x splits
    test = table.filter(pl.col("split") == "test")
    assert set(test["n"].to_list()) == {statements.filter(pl.col("split") == "test").height}  # same statements
    # each fact's two statements share their prefix up to the subject, so at subject_last the probe cannot rank
    # them: only near-ties inside a pair can move the AUROC off 0.5, by at most 1 / (conflicting statements)
    n_conflict = int(statements.filter(pl.col("split") == "test")["label"].sum())
    subject = test.filter(pl.col("position") == "subject_last")["auroc"].to_numpy()
    assert np.abs(subject - 0.5).max() <= 1 / n_conflict


def test_entity_positions_command_prints_the_best_layers(kf_run, capsys):
    from flows.cli import main

    cfg, paths = kf_run
    main(["entity-positions", "--run", "kf", "--runs-dir", str(cfg.runs_dir)])
    out = capsys.readouterr().out
    for kind in ("diffmean", "logistic"):
        for position in ("last", "subject_last"):
            assert f"{kind} at {position}: layer " in out
    assert f"figure: {analysis_path(paths.root, 'entity_positions_figure')}" in out


def test_report_section_and_refresh_after_the_command(kf_run, monkeypatch):
    """The run's report gains the comparison: the section reads the analysis table, and the command re-renders a
    run's existing report through its report stage, recorded in the manifest."""
    import json

    import tasks.report
    from flows.cli import main
    from tasks.probes.analyses_report import section_analyses
    from tasks.probes.entity_positions import summary

    cfg, paths = kf_run
    main(["entity-positions", "--run", "kf", "--runs-dir", str(cfg.runs_dir)])
    section = section_analyses(paths)
    table = read_table(analysis_path(paths.root, "entity_positions"))
    assert section.startswith("## Probe analyses") and summary(table) in section
    assert "](analyses/entity_positions.png)" in section and "clearflow transfer" not in section
    rendered = []

    def fake_report(view, p):
        rendered.append(p)
        p.report.write_text("rendered again")
        p.figures.mkdir(exist_ok=True)
        p.artifact("trace").write_text("<html></html>")

    monkeypatch.setattr(tasks.report, "run_report", fake_report)
    paths.report.write_text("an older report")
    main(["entity-positions", "--run", "kf", "--runs-dir", str(cfg.runs_dir)])
    assert rendered == [paths]
    record = json.loads(paths.manifest.read_text())["stages"]["report"]
    assert set(record["outputs"]) == {"report", "figures", "trace"} and paths.report.read_text() == "rendered again"
    paths.report.unlink()


def test_comparison_needs_subject_last(tiny_model, tmp_path):
    from flows.stages import STAGES
    from tasks.probes.entity_positions import compare_positions

    cfg = RunConfig.model_validate({"run": "plain", "runs_dir": str(tmp_path), "limit": 20,
                                    "model": {"name": tiny_model}, "activations": {"layers": [0]}})
    paths = RunPaths(tmp_path / "plain")
    paths.root.mkdir()
    for name in ("ingest", "decompose", "activations"):
        STAGES[name].function()(STAGES[name].view(cfg), paths)
    with pytest.raises(ValueError, match=r"no 'subject_last' activations .*`clearflow stage activations --run plain"):
        compare_positions(cfg, paths)
    assert json.loads(next(paths.activations.glob("model=*/meta.json")).read_text())["positions"] == ["last"]
