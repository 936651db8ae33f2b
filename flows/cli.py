"""`clearflow` command line: the pydantic config models are the options (pydantic-settings builds the parser)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, CliVariadicArg, SettingsConfigDict

import flows  # noqa: F401  (sets Prefect's offline defaults before Prefect is imported)
from flows.children import prepare_orchestrator
from flows.presets import PRESETS, deep_update, preset_config, preset_help, without_remote_code
from flows.stages import ORDER, STAGES
from tasks.core.config import EXECUTION, IngestConfig, RunConfig
from tasks.core.remote_store import check_remote, is_remote

log = logging.getLogger("clearflow")
StageName = Literal["ingest", "decompose", "activations", "probes", "finetune", "evaluate", "insideout", "report"]
assert set(StageName.__args__) == set(ORDER), "StageName must list every stage"


PRESET_HELP = "Named set of options applied before the options given (`clearflow presets`): " + preset_help()


def before_flows(cfg: RunConfig) -> None:
    """What a command checks and starts before its flows: the Dask scheduler and remote store it names, then
    Prefect (each unreachable one is a line in seconds, not a failure mid-run)."""
    if cfg.executor == "dask":
        from flows.scale import check_scheduler

        check_scheduler(cfg)
    if is_remote(store := cfg.activations.store or os.environ.get("CLEARFLOW_STORE")):
        check_remote(store)
    prepare_orchestrator()


class Run(RunConfig):
    """Run the whole pipeline (defaults: the offline known-facts benchmark on SmolLM2-135M)."""

    force: bool = Field(False, description="Re-run every stage even if its outputs are current.")
    preset: str | None = Field(None, description=PRESET_HELP)

    def given(self) -> dict[str, Any]:
        """The run options given on the command line."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"force", "preset", "seeds", "parallel"})

    def cli_cmd(self) -> None:
        from flows.runner import paths_of, pipeline_current

        cfg = preset_config(self.preset, self.given())
        if not self.force and pipeline_current(cfg):  # nothing to do: no orchestrator to start
            log.info("run %r: every stage is up to date, nothing ran (--force runs them again)", cfg.run)
            report = str(paths_of(cfg).report)
        else:
            from flows.pipeline import pipeline_flow

            before_flows(cfg)
            report = pipeline_flow(cfg=cfg, force=self.force)
        print(f"\nreport: {report}")
        print(f"query it: clearflow sql \"select * from metrics\" --runs-dir {cfg.runs_dir}")


class Sweep(Run):
    """Run the comparison once per fine-tuning seed, sharing every stage before fine-tuning; aggregate over seeds.

    --run names the sweep (a directory under --runs-dir holding one run per seed); the same command again resumes it.
    """

    seeds: CliVariadicArg[list[int]] = Field([0, 1, 2], description="Fine-tuning seeds, e.g. --seeds 0 1 2.")
    parallel: int = Field(1, ge=1, description="Seeds run at once after the first (each a pipeline sub-flow in its"
                          " own thread, torch's threads shared out unless --threads is given). Changes only speed.")

    def cli_cmd(self) -> None:
        from flows.sweep import check_parallel, check_seeds, sweep_flow

        check_seeds(self.seeds)
        cfg = preset_config(self.preset, self.given())
        check_parallel(self.parallel, cfg)
        before_flows(cfg)  # a bad preset, option or address fails here
        given = RunConfig.model_validate(self.given())  # knows which options were given: the preset fills the rest
        report = Path(sweep_flow(cfg=given, seeds=self.seeds, preset=self.preset, force=self.force,
                                 parallel=self.parallel))
        print(f"\nsweep report: {report}")
        print(f"query it: clearflow sql \"select * from sweep_metrics\" --runs-dir {given.runs_dir}")
        print(f"its seed runs: clearflow sql \"select * from all_metrics\" --runs-dir {report.parent}")


class Presets(BaseModel):
    """List the named option sets `--preset` accepts (flows/presets.py) and the options each sets now."""

    def cli_cmd(self) -> None:
        import json

        for p in PRESETS.values():
            print(f"{p.name}\n  {p.describe()}\n  options now: {json.dumps(p.overrides())}\n")


class Stage(RunConfig):
    """Run one stage of an existing run again, locally (options given here override the run's config)."""

    name: CliPositionalArg[StageName] = Field(description="Stage to run: " + ", ".join(ORDER))
    force: bool = Field(True, description="Run even if the stage's outputs are current.")

    def cli_cmd(self) -> None:
        from flows.runner import load_manifest, paths_of

        if not self.run:
            raise SystemExit("clearflow stage: --run NAME is required (a directory under --runs-dir)")
        given = self.model_dump(mode="json", exclude_unset=True, exclude={"name", "force"})
        base = RunConfig.model_validate(given | {"run": self.run})
        saved = load_manifest(paths_of(base)).get("config")
        if saved is None and STAGES[self.name].upstream:
            raise FileNotFoundError(f"no run {self.run!r} under {base.runs_dir}: start one with `clearflow run`")
        saved = {k: v for k, v in without_remote_code(saved or {}).items() if k not in EXECUTION}  # how it ran
        cfg = RunConfig.model_validate(deep_update(saved, given))
        if os.environ.get("PREFECT_API_URL") or cfg.executor == "dask":  # the stage's flow, seen in the UI (Dask
            from flows.pipeline import stage_flow  # workers report their task runs to a server: a temporary one here)

            before_flows(cfg)
            outputs = stage_flow(self.name)(cfg=cfg, force=self.force)
        else:  # no server: the same work and checks in this process, with no orchestrator to import or start
            from flows.execute import run_stage_with

            log.info("%-11s runs locally (no PREFECT_API_URL: start a Prefect server to see it in the UI)", self.name)
            outputs, _ = run_stage_with(self.name, cfg, self.force)
        for name, path in outputs.items():
            print(f"{name}: {path}")


class Sql(BaseModel):
    """Answer a read-only SQL query from the DuckDB catalog over the runs (views: items, sentences, ...)."""

    query: CliPositionalArg[str | None] = Field(
        None, description="SQL; plain table names are the chosen run, all_<table> every run, sweep_metrics the"
        " latest sweep's aggregate over seeds."
    )
    example: str | None = Field(None, description="Run a named example query instead (tasks/catalog/queries.py): "
                                "layer_separation, nearest_statements, top_flagged.")
    param: list[str] = Field([], description="NAME=VALUE parameter of the example (repeat the option).")
    runs_dir: Path = Field(Path("data/runs"), description="Where run directories live.")
    run: str | None = Field(None, description="Run the plain views show; default: the latest finished run.")
    store: str | None = Field(None, description="A remote activation store (s3://bucket/prefix): the activations"
                              " views read the runs' vectors from it, where they lie, instead of the local copies.")

    def sql(self) -> str:
        """The query to run: the given SQL, or the named example with its parameters filled in."""
        from tasks.catalog.queries import example_sql

        if (self.query is None) == (self.example is None):
            raise ValueError("give either a SQL query or --example NAME")
        if self.query is not None:
            return self.query
        params: dict[str, str | float] = {}
        for item in self.param:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--param {item!r}: expected NAME=VALUE")
            params[name.strip()] = _number_or_text(value)
        return example_sql(self.example, **params)

    def cli_cmd(self) -> None:
        import duckdb

        from tasks.catalog.remote import check_store_url
        from tasks.catalog.views import format_table, query

        sql = self.sql()
        if self.store:  # a wrong endpoint, key or bucket is one line, before the catalog is built
            check_remote(check_store_url(self.store))
        try:
            columns, rows = query(sql, self.runs_dir, run=self.run, confine=_OWNS_PROCESS, store=self.store)
        except duckdb.Error as exc:  # the analyst's SQL: say what DuckDB said, no traceback
            raise ValueError(f"query failed: {exc}") from None
        print(format_table(columns, rows))


class _TerminalFilter(logging.Filter):
    """What the terminal shows: clearflow's lines and every warning. Prefect's flow and task run lines (states,
    tracebacks) still reach the Prefect API, where the UI shows them; a failed run is reported here once, as one
    line (all of them with --debug). GX sets some of its module loggers to INFO at import."""

    debug = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return self.debug
        return record.levelno >= logging.WARNING or not record.name.startswith("great_expectations")


_TERMINAL = _TerminalFilter()
_OWNS_PROCESS = False  # set by main(): whether this process ends with the command (then it may confine itself)


def _number_or_text(value: str) -> str | float:
    """A parameter as the number it spells (a layer), else as text (a sentence)."""
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


class Datasets(BaseModel):
    """List the datasets `--dataset` accepts, with where to get each file."""

    def cli_cmd(self) -> None:
        from tasks.ingest.formats import READERS

        for r in READERS.values():
            usage = f"clearflow run --dataset {r.name}" + (" --data-path FILE" if r.needs_path else "")
            print(f"{r.name}\n  {r.summary}\n  get it: {r.source}\n  run:    {usage}\n")


class Stages(BaseModel):
    """List the stages: what each reads, writes and is configured by (declared in flows/stages.py)."""

    def cli_cmd(self) -> None:
        from flows.stages import stage_table

        print(stage_table())


class Report(BaseModel):
    """Write the report of a run again and print its path."""

    run: CliPositionalArg[str] = Field(description="Run name.")
    runs_dir: Path = Field(Path("data/runs"), description="Where run directories live.")

    def cli_cmd(self) -> None:
        Stage.model_validate({"name": "report", "run": self.run, "runs_dir": self.runs_dir}).cli_cmd()


class Transfer(BaseModel):
    """Score the saved probes of --run on the statements of another run (another source): a transfer AUROC table per
    probe kind and layer, written into --run (`clearflow sql "select * from probe_transfer"`). With --dataset, that
    other run is made first: its ingest, units and activations with --run's model (current stages are skipped,
    states already in the activation store are reused)."""

    run: str = Field(description="The run whose probes are scored (a directory under --runs-dir).")
    statements_run: str = Field(description="The run whose statements they score; made from --dataset when given.")
    runs_dir: Path = Field(Path("data/runs"), description="Where run directories live.")
    dataset: str | None = Field(None, description="Make --statements-run from this dataset (`clearflow datasets`).")
    data_path: Path | None = Field(None, description="Input file of --dataset (known-facts: bundled).")
    limit: int | None = Field(None, ge=1, description="Use at most this many records of --dataset.")
    seed: int | None = Field(None, description="Seed of --statements-run's splits; default: --run's.")
    ingest: IngestConfig = IngestConfig()

    def cli_cmd(self) -> None:
        from flows.transfer import DATASET_OPTIONS, transfer
        from tasks.core.storage import RunPaths
        from tasks.probes.transfer import transfer_summary

        prepare_orchestrator()

        given = self.model_dump(mode="json", exclude_unset=True, include=set(DATASET_OPTIONS))
        path, rows = transfer(self.run, self.statements_run, self.runs_dir, given)
        print(transfer_summary(RunPaths(self.runs_dir / self.run), rows))
        print(f"\ntransfer table: {path}")
        print(f"query it: clearflow sql \"select * from probe_transfer\" --run {self.run} --runs-dir {self.runs_dir}")


class EntityPositions(BaseModel):
    """Fit every probe kind per layer at the subject's last token and at the statement's last token, on the same
    statements (P-probing of Physics of LMs 3.1, asked of conflict); needs the run's activations with the position
    subject_last. Writes a table and a figure into the run (`clearflow sql "select * from entity_positions"`)."""

    run: str = Field(description="Run name (a directory under --runs-dir).")
    runs_dir: Path = Field(Path("data/runs"), description="Where run directories live.")

    def cli_cmd(self) -> None:
        from flows.transfer import entity_positions
        from tasks.probes.entity_positions import summary

        prepare_orchestrator()

        path, table = entity_positions(self.run, self.runs_dir)
        print(summary(table))
        print(f"\ntable: {path}\nfigure: {path.with_suffix('.png')}")


class Serve(RunConfig):
    """Serve Prefect deployments from this process: the pipeline on a schedule, every stage on demand."""

    cron: str = Field("0 3 * * *", description="When the pipeline deployment runs (cron, UTC).")

    def cli_cmd(self) -> None:
        import os

        if not os.environ.get("PREFECT_API_URL"):
            raise RuntimeError(
                "schedules need a Prefect server: start one with `prefect server start --host 127.0.0.1` "
                "and export PREFECT_API_URL=http://127.0.0.1:4200/api"
            )
        from prefect import serve
        from prefect.types.entrypoint import EntrypointType

        from flows.pipeline import pipeline_flow, stage_flows

        cfg = RunConfig.model_validate(self.model_dump(exclude={"cron"}) | {"runs_dir": self.runs_dir.resolve()})
        params = {"cfg": cfg.model_dump(mode="json")}
        by_module = EntrypointType.MODULE_PATH  # flows.<stage>.<stage>_flow, importable wherever clearflow is installed
        deployments = [
            pipeline_flow.to_deployment(name="clearflow", cron=self.cron, parameters=params, entrypoint_type=by_module)
        ]
        deployments += [
            f.to_deployment(name="clearflow", parameters=params, entrypoint_type=by_module)
            for f in stage_flows().values()
        ]
        serve(*deployments)


class Clearflow(BaseSettings):
    """CLEAR on a Prefect DAG: find the context sentences an LLM's memory disagrees with, and fix it."""

    model_config = SettingsConfigDict(
        cli_prog_name="clearflow",
        case_sensitive=True,  # the case-insensitive pre-pass cuts an argument "-- comment\nSELECT ..." at its newline
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        cli_hide_none_type=True,
        cli_enforce_required=True,
        nested_model_default_partial_update=True,
    )

    run: CliSubCommand[Run]
    sweep: CliSubCommand[Sweep]
    presets: CliSubCommand[Presets]
    stage: CliSubCommand[Stage]
    sql: CliSubCommand[Sql]
    report: CliSubCommand[Report]
    datasets: CliSubCommand[Datasets]
    stages: CliSubCommand[Stages]
    serve: CliSubCommand[Serve]
    transfer: CliSubCommand[Transfer]
    entity_positions: CliSubCommand[EntityPositions]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors for the user's mistakes, tracebacks only with --debug. Called with no
    argv it is the process's command (`clearflow ...`), which lets `sql` confine the whole process's writes; called
    with argv (from Python) it leaves the caller's process as it was."""
    global _OWNS_PROCESS
    _OWNS_PROCESS = argv is None
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for ours in ("clearflow", "tasks", "flows"):
        logging.getLogger(ours).setLevel(logging.INFO)
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    _TERMINAL.debug = debug
    for handler in logging.getLogger().handlers:
        if _TERMINAL not in handler.filters:
            handler.addFilter(_TERMINAL)
    _SIGTERMS.clear()
    previous = signal.signal(signal.SIGTERM, _terminate)
    witness = _SignalWitness()
    try:
        try:
            CliApp.run(Clearflow, cli_args=args)
        except Exception as exc:  # noqa: BLE001  (any error, a stop's included; others re-raised below)
            stop = wrapped_interrupt(exc) or (_SIGTERMS[0] if _SIGTERMS else None) or witness.sigterm()
            if stop is not None:
                raise stop from None
            if debug or not isinstance(exc, (ValueError, OSError, RuntimeError, KeyError)):
                raise
            print(f"clearflow: error: {one_line(exc)}", file=sys.stderr)
            raise SystemExit(2) from None
    except Terminated:
        print("clearflow: stopped by SIGTERM; the same command resumes (finished stages are kept)", file=sys.stderr)
        raise SystemExit(143) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("clearflow: interrupted; the same command resumes (finished stages are kept)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        witness.close()
        signal.signal(signal.SIGTERM, previous)


class _SignalWitness:
    """Whether a SIGTERM arrived, whichever Python handler took it. Prefect's flow engine swaps in its own handler
    while a flow runs, and where the signal lands in a task run's setup its engine turns the stop into
    ValueError("Task run is not set") chained to nothing, so neither our handler nor the exception says it was a stop.
    The interpreter's C-level handler writes every signal's number to the wakeup fd, whoever handles it in Python."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.read_end, False)
        os.set_blocking(self.write_end, False)
        self.armed = False
        try:
            held = signal.set_wakeup_fd(self.write_end, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no witness, the handler and the exception chain still count
            return
        if held != -1:  # the fd of an event loop the caller runs: leave it to the loop
            signal.set_wakeup_fd(held)
            return
        self.armed = True

    def sigterm(self) -> Terminated | None:
        """A stop if SIGTERM's number was written since the witness began."""
        try:
            seen = os.read(self.read_end, 4096)
        except BlockingIOError:
            return None
        return Terminated() if signal.SIGTERM in seen else None

    def close(self) -> None:
        if self.armed:
            signal.set_wakeup_fd(-1)
        os.close(self.read_end)
        os.close(self.write_end)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that cleanup runs as for Ctrl-C: `atexit` hooks run on the way out,
    Prefect's among them, which stops its temporary server (a default SIGTERM would end the process at once and
    leave the server running)."""


_SIGTERMS: list[Terminated] = []  # the stops raised since `main` began


def _terminate(signum: int, frame: Any) -> None:
    """Raise the stop, and remember it: code unwinding from it may raise an error of its own that does not chain it
    (Prefect's "Task run is not set" when the signal lands inside a task run's setup), and that error is the stop."""
    stop = Terminated()
    _SIGTERMS.append(stop)
    raise stop


def wrapped_interrupt(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind an error, where a signal landed inside code that wrapped it in its own error
    (Python 3.11 wraps an exception raised while a class is being built in a RuntimeError): a stop, not an error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: Exception) -> str:
    """An error as one line: pydantic's multi-line report of bad options becomes its messages, '; '-joined; any other
    message keeps its first line (a library's advice after it is not the user's problem)."""
    if not isinstance(exc, ValidationError):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return lines[0] if lines else type(exc).__name__
    parts = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")  # a validator's own message, without pydantic's prefix
        where = ".".join(str(part) for part in err["loc"][1:])  # loc[0] is the subcommand
        parts.append((f"{where}: " if where else "") + (str(cause) if cause else err["msg"]))
    return "; ".join(parts)


if __name__ == "__main__":
    main()
