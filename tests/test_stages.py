"""The stage declarations: one writer per artifact, reads after writes, config views, staleness, suites."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from flows.runner import fingerprint, produced
from flows.stages import ORDER, RUNNER_ARTIFACTS, STAGES, WRITER, Stage, writers
from schemas.layout import LAYOUT
from schemas.suites import SUITES
from schemas.tables import ITEMS, TABLES
from tasks.core.config import ConfigView, RunConfig, UndeclaredConfigError
from tasks.core.storage import RunPaths, write_parquet


def test_every_table_is_written_by_exactly_one_stage():
    counts = Counter(a for s in STAGES.values() for a in s.writes)
    assert {t: counts[t] for t in TABLES} == dict.fromkeys(TABLES, 1)


def test_every_artifact_has_one_writer_stage_or_the_runner():
    counts = Counter(a for s in STAGES.values() for a in s.writes)
    for name in LAYOUT:
        assert counts[name] + (name in RUNNER_ARTIFACTS) == 1, name
    assert set(WRITER) | set(RUNNER_ARTIFACTS) == set(LAYOUT)


def test_every_read_is_written_by_an_earlier_stage():
    for i, name in enumerate(ORDER):
        stage = STAGES[name]
        assert not set(stage.reads) & set(stage.writes), name
        for a in stage.reads:
            assert ORDER.index(WRITER[a]) < i, (name, a)
        assert set(stage.upstream) == {WRITER[a] for a in stage.reads}


def test_upstream_is_derived_from_reads():
    assert STAGES["ingest"].upstream == ()
    assert STAGES["decompose"].upstream == ("ingest",)
    assert STAGES["probes"].upstream == ("ingest", "decompose", "activations")
    assert STAGES["report"].upstream == ("ingest", "decompose", "probes", "finetune", "evaluate", "insideout")


def test_a_second_writer_or_an_unwritten_read_is_refused():
    a = Stage("a", "m:f", reads=(), writes=("items",), config=(), summary="")
    b = Stage("b", "m:f", reads=(), writes=("items",), config=(), summary="")
    with pytest.raises(ValueError, match="'items' is written by both 'a' and 'b'"):
        writers([a, b])
    c = Stage("c", "m:f", reads=("sentences",), writes=("metrics",), config=(), summary="")
    with pytest.raises(ValueError, match=r"stage 'c' reads \['sentences'\], which no earlier stage writes"):
        writers([a, c])
    with pytest.raises(ValueError, match="'manifest' is written by both 'the runner' and 'a'"):
        writers([Stage("a", "m:f", reads=(), writes=("manifest",), config=(), summary="")])


def test_unknown_artifact_or_config_section_fails_at_declaration():
    with pytest.raises(KeyError, match="unknown run artifact 'tables'"):
        Stage("x", "m:f", reads=("tables",), writes=(), config=(), summary="")
    with pytest.raises(ValueError, match=r"unknown config sections \['probes'\]"):
        Stage("x", "m:f", reads=(), writes=(), config=("probes",), summary="")


def test_quality_suites_are_the_declared_tables_that_have_one():
    checked = Counter(t for s in STAGES.values() for t in s.suites)
    assert checked == Counter(list(SUITES))  # every suite runs, after exactly one stage
    assert STAGES["probes"].suites == ("probe_metrics", "probe_localisation", "sentence_scores")
    assert STAGES["finetune"].suites == () and STAGES["report"].suites == ()


def test_run_paths_come_from_the_layout(tmp_path):
    paths = RunPaths(tmp_path)
    for name, art in LAYOUT.items():
        assert paths.artifact(name) == tmp_path / art.path
    assert paths.table("probe_metrics") == tmp_path / "probes" / "metrics.parquet"
    assert (paths.manifest, paths.arm_adapter("sft"), paths.train_log) == (
        tmp_path / "manifest.json", tmp_path / "adapters" / "sft", tmp_path / "adapters" / "train_log.json")
    with pytest.raises(KeyError, match="unknown table 'activations'"):
        paths.table("activations")  # an artifact, but a directory, not a table


def test_a_stage_reading_an_undeclared_section_is_a_clear_error():
    view = STAGES["activations"].view(RunConfig())
    assert view.activations.batch_size == 32 and view.model.name == RunConfig().model.name
    with pytest.raises(UndeclaredConfigError, match=r"stage 'activations' read config section 'seed', which it does not"
                       r" declare .*add 'seed' to its config=\(\.\.\.\) in flows/stages.py"):
        view.seed
    for outside in ("run", "runs_dir"):  # stages get their paths, not the run's name or directory
        with pytest.raises(UndeclaredConfigError):
            getattr(view, outside)
    with pytest.raises(AttributeError):
        view.no_such_field  # noqa: B018  (not a section: a plain AttributeError, as copy and getattr expect)
    with pytest.raises(ValueError, match="unknown config section"):
        RunConfig().view("nope")


def test_view_digest_is_that_of_its_sections_and_survives_a_rebase():
    cfg = RunConfig(seed=3)
    view = cfg.view("seed", "model", stage="x")
    assert view.digest() == cfg.digest("seed", "model") and RunConfig().view().digest() == ""
    other = view.over(RunConfig(seed=9))
    assert isinstance(other, ConfigView) and other.sections == ("seed", "model") and other.seed == 9
    with pytest.raises(UndeclaredConfigError, match="stage 'x'"):
        other.probe


def _llm_cfg(**update) -> RunConfig:
    llm = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "temperature": 0.9}
    return RunConfig.model_validate({"run": "t", "decompose": {"method": "llm", "llm": llm}, **update})


def test_decompose_without_its_seed_declaration_fails_loudly(tmp_path):
    """The old bug: the LLM chat read cfg.seed, undeclared; under a view that read is an error, not a silent miss."""
    from tasks.decompose.stage import run_decompose

    paths = RunPaths(tmp_path)
    item = {"item_id": "a", "dataset": "x", "split": "test", "group": "g", "question": "Q?", "context": "A b.",
            "answers": ["b"], "counterfactual": True}
    write_parquet([item], paths.table("items"), ITEMS)
    with pytest.raises(UndeclaredConfigError, match="'seed'"):
        run_decompose(_llm_cfg().view("decompose", "model", stage="decompose"), paths)


def test_a_seed_change_makes_the_llm_decomposition_stale():
    manifest = _recorded(_llm_cfg())
    before = fingerprint(STAGES["decompose"], _llm_cfg(), manifest)
    assert fingerprint(STAGES["decompose"], _llm_cfg(seed=1), manifest) != before


def _recorded(cfg: RunConfig) -> dict:
    """A manifest as after a full run of `cfg` (outputs hashed by name; no stage actually runs)."""
    manifest: dict = {"stages": {}}
    for name in ORDER:
        stage = STAGES[name]
        outputs = {a: {"path": LAYOUT[a].path, "sha256": f"{a}-0"} for a in stage.writes}
        manifest["stages"][name] = {"fingerprint": fingerprint(stage, cfg, manifest), "outputs": outputs}
    return manifest


def _stale_after(cfg: RunConfig, changed: RunConfig) -> set[str]:
    """Stages that re-run, in order, when `changed` replaces `cfg`; a re-run stage gives new output hashes."""
    manifest = json.loads(json.dumps(_recorded(cfg)))
    stale = set()
    for name in ORDER:
        stage, rec = STAGES[name], manifest["stages"][name]
        if fingerprint(stage, changed, manifest) != rec["fingerprint"]:
            stale.add(name)
            rec["outputs"] = {a: {**o, "sha256": f"{a}-1"} for a, o in rec["outputs"].items()}
    return stale


def _declaring_and_downstream(section: str) -> set[str]:
    out = {n for n, s in STAGES.items() if section in s.config}
    for name in ORDER:
        if set(STAGES[name].upstream) & out:
            out.add(name)
    return out


@pytest.mark.parametrize(
    ("section", "update"),
    [
        ("seed", {"seed": 7}),
        ("probe", {"probe": {"threshold": 0.7}}),
        ("finetune", {"finetune": {"lr": 0.001}}),
        ("evaluate", {"evaluate": {"bootstrap": 10}}),
        ("decompose", {"decompose": {"top_k": 2}}),
        ("activations", {"activations": {"batch_size": 4}}),
        ("model", {"model": {"dtype": "bfloat16"}}),
    ],
)
def test_a_section_change_makes_its_declarers_and_their_downstream_stale(section, update):
    cfg = RunConfig(run="t")
    changed = RunConfig.model_validate({**cfg.model_dump(), **update})
    assert _stale_after(cfg, changed) == _declaring_and_downstream(section)
    assert _stale_after(cfg, cfg) == set()


def test_probes_change_leaves_upstream_current():
    changed = RunConfig(run="t", probe={"threshold": 0.7})
    assert _stale_after(RunConfig(run="t"), changed) == {"probes", "finetune", "evaluate", "report"}


def test_a_declared_output_the_stage_did_not_write_is_an_error(tmp_path):
    paths = RunPaths(tmp_path)
    with pytest.raises(RuntimeError, match=r"stage 'finetune' finished without writing adapters \(adapters\),"
                       r" train_log \(adapters/train_log.json\)"):
        produced(STAGES["finetune"], paths)
    paths.train_log.parent.mkdir()
    paths.train_log.write_text("{}")
    assert produced(STAGES["finetune"], paths) == {"adapters": paths.adapters, "train_log": paths.train_log}


def test_report_config_from_the_manifest_stays_a_view(tmp_path):
    from tasks.report import run_config

    paths = RunPaths(tmp_path)
    paths.manifest.write_text(json.dumps({"config": RunConfig(seed=1234).model_dump(mode="json")}))
    conf = run_config(STAGES["report"].view(RunConfig()), paths)
    assert conf.seed == 1234
    with pytest.raises(UndeclaredConfigError, match="stage 'report'"):
        conf.probe


def test_the_chat_takes_its_batch_and_seed_from_what_decompose_declares():
    from tasks.core.config import LLMConfig, ModelConfig
    from tasks.decompose.llm import make_chat

    chat = make_chat(LLMConfig(batch_size=3, temperature=0.5), ModelConfig(), seed=5)
    assert (chat.backend.batch_size, chat.backend.seed) == (3, 5)
    assert chat.backend.identity()["seed"] == 5  # a seed change at temperature > 0 asks the model again
    assert LLMConfig().batch_size == 16  # as the evaluation batch it used to borrow


def test_registering_a_method_makes_a_default_evaluation_stale(monkeypatch):
    """evaluate.methods None means the registry's default methods: a new default one must re-run evaluate."""
    import dataclasses

    from tasks.evaluate.methods import REGISTRY

    cfg = RunConfig(run="t")
    manifest = _recorded(cfg)
    before = fingerprint(STAGES["evaluate"], cfg, manifest)
    extra = dataclasses.replace(REGISTRY["full_context"], name="full_context_again")
    monkeypatch.setitem(REGISTRY, extra.name, extra)
    assert fingerprint(STAGES["evaluate"], cfg, manifest) != before
    pinned = RunConfig(run="t", evaluate={"methods": ["full_context"]})  # an explicit list is unaffected
    assert fingerprint(STAGES["evaluate"], pinned, manifest) == fingerprint(STAGES["evaluate"], pinned, _recorded(pinned))
