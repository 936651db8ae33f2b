"""Hostile input (issue 12): records, options, model directories and SQL built to break clearflow, each checked for
the exact outcome a user sees: a rejects row with its reason (the other records kept), or one clear line and exit
code 2, and nothing written outside the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import schemas.rejects as R
import tasks.ingest.formats.items as items_mod
from flows.cli import main
from flows.presets import without_remote_code
from flows.transfer import saved_config
from tasks.catalog.views import ReadOnlyQueryError, query
from tasks.core.config import ModelConfig, RunConfig
from tasks.core.models import load_model, load_tokenizer
from tasks.core.storage import RunPaths, read_table, write_json
from tasks.ingest.formats import READERS, FormatError, ReadOptions
from tasks.ingest.stage import run_ingest

ZWSP = "\u200b"
GOOD = [{"id": f"g{i}", "question": f"Who wrote book {i}?", "context": f"Book {i} was written by Ann {i}.",
         "answers": [f"Ann {i}"]} for i in range(6)]  # fmt: skip
WORDS = ReadOptions(max_context_tokens=50, count_tokens=lambda t: len(t.split()),
                    max_question_tokens=20, count_question=lambda t: len(t.split()))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _read(tmp_path: Path, lines: list[str], opts: ReadOptions = WORDS):
    """Read a SQuAD-rows JSONL file: the good records, then the hostile lines."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in GOOD] + lines) + "\n", encoding="utf-8")
    return READERS["squad"].read(path, opts)


def _record(**fields) -> str:
    base = {"id": "bad", "question": "Who?", "context": "Ann wrote it.", "answers": ["Ann"]}
    return json.dumps({**base, **fields})


# (hostile JSONL line, reason of its rejects row, words its detail must hold)
RECORDS = {
    "nested 5000 deep (past the parser)": ('{"id": "x", "q": ' + _nested(5000) + "}", R.MALFORMED_JSON, "nested more"),
    "nested 100 deep (parses)": (_record(extra=json.loads(_nested(100))), R.MALFORMED_JSON, "nested more"),
    "question of zero-width characters": (_record(question=ZWSP * 5), R.EMPTY_QUESTION, "invisible"),
    "context of a BOM and a joiner": (_record(context="\ufeff\u200d"), R.EMPTY_CONTEXT, "invisible"),
    "answers of zero-width spaces only": (_record(answers=[ZWSP, ZWSP * 2]), R.EMPTY_ANSWERS, "no answer"),
    "100k-character question": (_record(question="why " * 25_000), R.QUESTION_TOO_LONG, "25000 tokens"),
    "context holding <conflict>": (_record(context="Ann <conflict>wrote</conflict> it."), R.RESERVED_MARKER,
                                   "context holds"),
    "question holding </CONFLICT>": (_record(question="Who </CONFLICT> wrote it?"), R.RESERVED_MARKER,
                                     "question holds"),
    "a JSON array line": ("[1, 2, 3]", R.NOT_AN_OBJECT, "list"),
    "a JSON number line": ("42", R.NOT_AN_OBJECT, "int"),
    "a JSON string line": ('"just text"', R.NOT_AN_OBJECT, "str"),
    "truncated JSON": ('{"id": "t", "question": "Who', R.MALFORMED_JSON, "line 7"),
    "question is a number": (_record(question=7), R.WRONG_TYPE, "'question' is a int"),
    "answers is an object": (_record(answers={"x": 1}), R.MISSING_FIELD, "no 'text' list"),
    "id is a list": (_record(id=[1]), R.WRONG_TYPE, "'id' is a list"),
    "id is a boolean": (_record(id=True), R.WRONG_TYPE, "'id' is a bool"),
    "context missing": (json.dumps({"id": "m", "question": "Who?", "answers": ["Ann"]}), R.MISSING_FIELD,
                        "'context' is missing"),
    "duplicate id": (_record(id="g0"), R.DUPLICATE_ID, "same id as record 0"),
    "context over the budget": (_record(context="word " * 60), R.CONTEXT_TOO_LONG, "60 tokens"),
    "lone surrogate escape": ('{"id": "s", "question": "Who \\ud800?", "context": "c.", "answers": ["a"]}',
                              R.UNDECODABLE, "not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_hostile_record_is_refused_with_its_reason_and_the_rest_kept(tmp_path, case):
    line, reason, detail = RECORDS[case]
    out = _read(tmp_path, [line])
    assert out.n_read == len(GOOD) + 1 and out.n_kept == len(GOOD) and len(out.items) == len(GOOD)
    (reject,) = out.rejects
    assert reject["reason"] == reason and detail in reject["detail"], reject
    assert reject["record"] == len(GOOD)  # the position of the hostile line among the records


def test_invalid_utf8_bytes_are_refused_per_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([json.dumps(r).encode() for r in GOOD] + [b'{"id": "u", "question": "\xff\xfe"}']))
    out = READERS["squad"].read(path, WORDS)
    assert out.n_kept == len(GOOD) and [r["reason"] for r in out.rejects] == [R.UNDECODABLE]


def test_a_zero_width_copy_of_a_question_lands_in_the_same_split(tmp_path):
    """The same question with a zero-width space inside must not reach two splits (it is one question)."""
    copies = [{**r, "id": f"copy{i}", "question": r["question"].replace("book", f"bo{ZWSP}ok")}
              for i, r in enumerate(GOOD)]
    out = _read(tmp_path, [json.dumps(c) for c in copies])
    split = {r["item_id"]: r["split"] for r in out.items}
    for i in range(len(GOOD)):
        assert split[f"squad-copy{i}"] == split[f"squad-g{i}"]


def test_truncation_splits_only_the_part_of_a_huge_context_that_can_fit(tmp_path, monkeypatch):
    """A 2 MB context under --ingest.truncation truncate: sentence splitting (superlinear) sees a window of a few
    budgets, not the whole context, and the kept prefix is whole sentences within the budget."""
    seen: list[int] = []
    split = items_mod.split_sentences
    monkeypatch.setattr(items_mod, "split_sentences", lambda text: seen.append(len(text)) or split(text))
    huge = " ".join(f"Sentence number {i} is here." for i in range(80_000))
    opts = ReadOptions(max_context_tokens=50, count_tokens=lambda t: len(t.split()), truncation="truncate")
    out = _read(tmp_path, [_record(context=huge)], opts)
    item = next(r for r in out.items if r["item_id"] == "squad-bad")
    assert item["truncated"] and len(item["context"].split()) <= 50 and item["context"].endswith("here.")
    assert huge.startswith(item["context"]) and len(item["context"].split()) > 40  # as many sentences as fit
    assert max(seen) <= 8 * 4 * 50  # the doubling window stops within a few times the budget


@pytest.mark.parametrize("content, found", [("", "not JSON"), ("[]", "no records"), ('{"data": 5}', "keys"),
                                            ("not json at all", "not JSON")])
def test_a_file_that_is_not_the_format_stops_with_one_line(tmp_path, content, found):
    path = tmp_path / "in.json"
    path.write_text(content)
    with pytest.raises(FormatError, match=found) as err:
        READERS["squad"].read(path, WORDS)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_json_file_nested_past_the_parser_is_a_format_error(tmp_path):
    path = tmp_path / "in.json"
    path.write_text(_nested(100_000))
    with pytest.raises(FormatError, match="nested too deep"):
        READERS["squad"].read(path, WORDS)


def test_a_directory_as_data_path_is_named_as_a_directory(tmp_path):
    with pytest.raises(FormatError, match="found a directory"):
        READERS["squad"].read(tmp_path, WORDS)


def test_a_directory_as_data_path_is_named_as_a_directory_by_the_stage(tmp_path):
    """The stage (which records the input file's hash first) says 'is a directory', not 'does not exist'."""
    cfg = RunConfig(dataset="squad", data_path=tmp_path, run="r", runs_dir=tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match=f"file {tmp_path} is a directory: give the dataset's file itself"):
        run_ingest(cfg, RunPaths(tmp_path / "runs" / "r"))


def test_every_record_refused_still_writes_the_rejects(tmp_path):
    """When no record is usable the run stops, and the rejects table holding every reason is there to read."""
    path = tmp_path / "all_bad.jsonl"
    path.write_text("\n".join([_record(id=f"b{i}", question=ZWSP) for i in range(3)] + ["[1]"]) + "\n")
    cfg = RunConfig(dataset="squad", data_path=path, run="r", runs_dir=tmp_path / "runs")
    paths = RunPaths(tmp_path / "runs" / "r")
    with pytest.raises(ValueError, match="no usable items.*the reasons are in .*rejects"):
        run_ingest(cfg, paths)
    rejects = read_table(paths.table("rejects"))
    assert sorted(rejects["reason"].to_list()) == [R.EMPTY_QUESTION] * 3 + [R.NOT_AN_OBJECT]
    assert not paths.table("items").exists()


# ------------------------------------------------------------------------------------------ options on the CLI
CLI = {
    "run escaping upwards": (["stage", "report", "--run", "../x"], "'../x' is not a run name"),
    "run as an absolute path": (["stage", "report", "--run", "/tmp/x"], "'/tmp/x' is not a run name"),
    "run with a separator": (["stage", "report", "--run", "a/b"], "'a/b' is not a run name"),
    "run hidden": (["stage", "report", "--run", ".x"], "'.x' is not a run name"),
    "run of 200 characters": (["stage", "report", "--run", "r" * 200], "at most 128"),
    "negative seed": (["run", "--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    "seed past 32 bits": (["run", "--seed", str(2**32)], "seed: Input should be less than or equal to 4294967295"),
    "negative fine-tuning seed": (["run", "--finetune.seed", "-3"], "finetune.seed: Input should be greater"),
    "negative sweep seed": (["sweep", "--seeds", "-1"], "--seeds must lie in 0..4294967295"),
    "zero limit": (["run", "--limit", "0"], "limit: Input should be greater than or equal to 1"),
    "unknown stage": (["stage", "nope", "--run", "x"], "name: Input should be"),
    "unknown dataset option value": (["run", "--ingest.truncation", "cut"], "ingest.truncation: Input should be"),
    "stage of a run that does not exist": (["stage", "report", "--run", "ghost"], "no run 'ghost'"),
    "two SQL statements": (["sql", "select 1; select 2"], "runs one statement"),
    "SQL writing a file": (["sql", "copy (select 1) to 'x.csv'"], "COPY statements are refused"),
    "empty SQL": (["sql", "  "], "holds no statement"),
    "SQL and an example at once": (["sql", "select 1", "--example", "top_flagged"], "either a SQL query or"),
}


@pytest.mark.parametrize("case", list(CLI))
def test_hostile_option_gets_one_line_and_exit_2(tmp_path, capsys, case):
    argv, message = CLI[case]
    runs = tmp_path / "runs"
    (runs / "real").mkdir(parents=True)
    write_json({"run": "real", "finished_at": "2026-01-01T00:00:00+00:00"}, runs / "real" / "manifest.json")
    with pytest.raises(SystemExit) as ended:
        main([*argv, "--runs-dir", str(runs)])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 2, err
    assert err.startswith("clearflow: error: ") and "\n" not in err and message in err, err
    assert sorted(p.name for p in runs.iterdir()) == ["real"]  # nothing new under the runs dir


def test_sql_opening_with_a_comment_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "real").mkdir(parents=True)
    write_json({"run": "real"}, runs / "real" / "manifest.json")
    main(["sql", "-- how many runs\nselect count(*) as n from runs", "--runs-dir", str(runs)])
    assert capsys.readouterr().out.splitlines()[2].split() == ["1"]


# ------------------------------------------------------------------------------------------ models
def test_a_model_that_does_not_exist_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer):
        with pytest.raises(FileNotFoundError) as err:
            load(ModelConfig(name="nobody/no-such-model-xyz"))
        assert "model 'nobody/no-such-model-xyz' cannot be loaded (the hub is off" in str(err.value)
        assert "\n" not in str(err.value)


def test_a_pickle_only_model_directory_is_refused_before_loading(tmp_path, tiny_model):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    for f in Path(tiny_model).glob("*.json"):
        (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "pytorch_model.bin").write_bytes(b"not even a real pickle")
    with pytest.raises(ValueError, match="pickle files only") as err:
        load_model(ModelConfig(name=str(model_dir)))
    assert "\n" not in str(err.value)


def test_trust_remote_code_is_never_taken_from_a_run_directory(tmp_path):
    """A run's recorded config saying trust_remote_code=true (anyone who can write the run could have put it there)
    does not turn it on for a later command on that run."""
    paths = RunPaths(tmp_path / "r")
    recorded = RunConfig(model=ModelConfig(trust_remote_code=True)).model_dump(mode="json")
    write_json({"config": recorded}, paths.manifest)
    assert saved_config(paths)["model"]["trust_remote_code"] is False
    assert without_remote_code(recorded)["model"] == {**recorded["model"], "trust_remote_code": False}
    assert recorded["model"]["trust_remote_code"] is True  # the record itself is left as it was


# ------------------------------------------------------------------------------------------ SQL
@pytest.fixture()
def one_run(tmp_path) -> Path:
    runs = tmp_path / "runs"
    (runs / "real").mkdir(parents=True)
    write_json({"run": "real"}, runs / "real" / "manifest.json")
    pl.DataFrame({"x": [1]}).write_parquet(runs / "real" / "secret_neighbour.parquet")
    return runs


def test_an_activations_link_to_the_root_opens_nothing_outside(one_run, tmp_path):
    """A run directory whose activations/ is a link to / must not make / readable."""
    evil = one_run / "evil"
    evil.mkdir()
    write_json({"run": "evil"}, evil / "manifest.json")
    (evil / "activations").symlink_to("/")
    outside = tmp_path / "outside.csv"
    outside.write_text("secret\n1\n")
    for sql in (f"select * from read_csv('{outside}')", "select * from read_csv('/etc/passwd')"):
        with pytest.raises(Exception, match="Permission|not allowed|disabled"):
            query(sql, one_run)


def test_sql_writes_nothing_under_the_runs_directory(one_run):
    """A query builds its catalog elsewhere, so a read-only share of runs can be queried (as root, which chmod does
    not stop, the test checks the cause: not one file appears or changes under the runs directory)."""
    before = sorted(p.relative_to(one_run) for p in one_run.rglob("*"))
    columns, rows = query("select count(*) from runs", one_run)
    assert rows == [(1,)]
    assert sorted(p.relative_to(one_run) for p in one_run.rglob("*")) == before


_UNCHECKED_QUERY = """
import sys
from pathlib import Path
import duckdb
import tasks.catalog.views as views
views.check_read_only = duckdb.extract_statements  # as if the statement check had a hole
sql, runs, how = sys.argv[1:]
if how == "command":  # the `clearflow sql` process itself
    from flows.cli import main
    sys.argv = ["clearflow", "sql", sql, "--runs-dir", runs]
    main()
    sys.exit(0)
try:
    views.query(sql, Path(runs), confine=how == "confined")
except duckdb.Error as exc:
    print(exc)
    sys.exit(1)
"""


@pytest.mark.parametrize("how", ["command", "confined", "open"])
def test_the_sql_process_cannot_write_even_past_the_statement_check(one_run, tmp_path, how):
    """Under the statement check, the kernel (Landlock) refuses the `clearflow sql` process every write outside
    its scratch space: a COPY that got through the check still writes nothing in the runs dir. The unconfined
    control shows that the DuckDB connection alone would have written it."""
    target = one_run / "real" / "written.csv"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "CLEARFLOW_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _UNCHECKED_QUERY, f"COPY (SELECT 42 AS x) TO '{target}'",
                           str(one_run), how], env=env, capture_output=True, text=True, timeout=120)
    said = done.stdout + done.stderr
    if how == "open":
        assert done.returncode == 0, said
        assert target.read_text().split() == ["x", "42"]
        return
    assert done.returncode == (2 if how == "command" else 1) and "Permission denied" in said, said
    assert not target.exists() and list((tmp_path / "cache" / "sql").iterdir()) == []


def test_the_sql_command_answers_confined(one_run, tmp_path):
    env = {**os.environ, "CLEARFLOW_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "sql", "select count(*) as n from runs", "--runs-dir",
                           str(one_run)], env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[2].split() == ["1"], done.stderr
    assert list((tmp_path / "cache" / "sql").iterdir()) == []  # the query's scratch directory is gone


def test_multiple_statements_are_refused_before_any_runs(one_run):
    with pytest.raises(ReadOnlyQueryError, match="holds 2"):
        query("select 1; select 2", one_run)


def test_tables_get_the_mode_the_umask_gives(tmp_path):
    """Analysts sharing a runs directory can read each other's tables: not the 0600 of a temp file."""
    import os

    from schemas.tables import REJECTS
    from tasks.core.storage import write_parquet

    mask = os.umask(0o022)
    os.umask(mask)
    path = write_parquet([], tmp_path / "t.parquet", REJECTS)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_fine_tune_that_changes_only_middle_bytes_gets_another_fingerprint(tmp_path, monkeypatch):
    """The model fingerprint hashes every byte of the weights (the activation store's key depends on it), and
    each file version is hashed once: the digest is remembered by path, inode, size and mtime."""
    import tasks.core.storage as storage
    from tasks.core.models import model_fingerprint

    monkeypatch.setenv("CLEARFLOW_CACHE", str(tmp_path / "cache"))
    weights = bytearray(range(256)) * (3 * 4096 * 2)  # 6 MiB: the old fingerprint read only the first and last MiB
    fingerprints = []
    for name, middle in (("base", 0), ("tuned", 1)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama"}')
        changed = bytearray(weights)
        changed[len(changed) // 2] ^= middle
        (d / "model.safetensors").write_bytes(bytes(changed))
        fingerprints.append(model_fingerprint(ModelConfig(name=str(d)))["local"])
    assert fingerprints[0] != fingerprints[1]
    hashed: list[Path] = []
    real = storage.file_sha256
    monkeypatch.setattr(storage, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert model_fingerprint(ModelConfig(name=str(tmp_path / "base")))["local"] == fingerprints[0]
    assert hashed == []  # remembered: no byte read again
    (tmp_path / "base" / "model.safetensors").write_bytes(bytes(weights) + b"x")  # a new version is hashed anew
    assert model_fingerprint(ModelConfig(name=str(tmp_path / "base")))["local"] != fingerprints[0]
    assert [p.name for p in hashed] == ["model.safetensors"]


def test_a_second_process_on_the_same_run_waits_for_the_first(tiny_cfg, prefect_harness, tmp_path, monkeypatch):
    """Two processes writing one run: the second waits (and says so) until the first lets the run go."""
    import logging
    import subprocess
    import sys

    from flows.orchestrate import run_stage

    lock, released = Path(tiny_cfg.runs_dir) / f".{tiny_cfg.run}.lock", tmp_path / "released"
    lock.parent.mkdir(parents=True, exist_ok=True)
    hold = (f"import time, pathlib; from filelock import FileLock; held = FileLock({str(lock)!r}); held.acquire();"
            f" print('held', flush=True); time.sleep(1); pathlib.Path({str(released)!r}).touch()")  # then exits
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = said.append
    logger = logging.getLogger("tasks.core.storage")
    level = logger.level
    monkeypatch.setattr(logger, "disabled", False)  # a logging setup (Prefect's) may have disabled it
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        outputs, _ = run_stage("ingest", tiny_cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert released.exists()  # the stage ran only after the holder had finished
    assert holder.wait(timeout=30) == 0 and Path(outputs["items"]).exists()
    assert [r.getMessage().split(" (lock")[0] for r in said] == [f"run {tiny_cfg.run}: another process is writing it;"
                                                                 " waiting"]


def test_a_full_disk_keeps_the_old_table_and_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC while a table is written: the previous table stays whole, no temp file is left, and the command ends
    with one line naming the error (exit 2)."""
    import errno

    import pyarrow.parquet as pq

    import flows.cli as cli
    from schemas.tables import REJECTS
    from tasks.core.storage import write_parquet

    path = write_parquet([], tmp_path / "rejects.parquet", REJECTS)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_parquet([{"source": "s", "record": 1, "record_id": None, "reason": "x", "detail": "d", "raw": "{}"}],
                      path, REJECTS)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["rejects.parquet"]
    monkeypatch.setattr(cli.CliApp, "run", lambda *a, **k: disk_full(None, path))
    with pytest.raises(SystemExit) as ended:
        main(["presets"])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 2 and err == f"clearflow: error: [Errno 28] No space left on device: '{path}'"
