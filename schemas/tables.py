"""Arrow schemas of every table a run writes: the contract between stages."""

from __future__ import annotations

import pyarrow as pa

STR = pa.string()
STR_LIST = pa.list_(pa.string())

SENTENCE_LABEL = pa.struct(
    [pa.field("text", STR), pa.field("truthful", pa.bool_()), pa.field("relevant", pa.bool_())]
)

ITEMS = pa.schema(
    [
        pa.field("item_id", STR, nullable=False),
        pa.field("dataset", STR, nullable=False),
        pa.field("split", STR, nullable=False),  # train / dev / test
        pa.field("group", STR, nullable=False),  # unit that never straddles splits (the subject)
        pa.field("relation_id", STR),
        pa.field("question", STR, nullable=False),
        pa.field("context", STR, nullable=False),  # the context the model is given (counterfactual)
        pa.field("answers", STR_LIST, nullable=False),  # context answer + aliases
        pa.field("orig_answers", STR_LIST),  # memorised (original) answer + aliases
        pa.field("orig_context", STR),  # the same context with the original answer
        pa.field("target_sentence", STR),  # the context sentence that carries the answer, where known
        pa.field("counterfactual", pa.bool_(), nullable=False),
        pa.field("source_id", STR),  # the record's id in its source file, where it has one
        pa.field("choices", STR_LIST),  # multiple-choice options, shown with the question (FaithEval)
        pa.field("instruction", STR),  # extra answer-format instruction (FaithEval: answer "unknown")
        pa.field("truncated", pa.bool_()),  # the context was cut to the token budget (ingest.truncation)
        pa.field("condition", STR),  # counterfactual / aligned / irrelevant context (KAFT's conditions), where known
        pa.field("question_template", STR),  # id of the question wording, where the benchmark generates questions
        pa.field("sentence_template", STR),  # id of the answer-bearing sentence's wording, likewise
        # what the generator knows of each sentence it put in the context (decompose labels units from it)
        pa.field("sentence_labels", pa.list_(SENTENCE_LABEL)),
    ]
)

CONDITIONS = ("counterfactual", "aligned", "irrelevant")

STATEMENTS = pa.schema(
    [
        pa.field("stmt_id", STR, nullable=False),
        pa.field("key", STR, nullable=False),  # tasks.core.storage.text_key(text): activation key
        pa.field("text", STR, nullable=False),
        pa.field("label", pa.int8(), nullable=False),  # 1 conflicting (false), 0 aligned (true)
        pa.field("group", STR, nullable=False),
        pa.field("relation_id", STR),
        pa.field("split", STR, nullable=False),
    ]
)

REJECTS = pa.schema(
    [
        pa.field("source", STR, nullable=False),  # file or dataset the record came from
        pa.field("record", pa.int64(), nullable=False),  # position in the source
        pa.field("record_id", STR),
        pa.field("reason", STR, nullable=False),  # short machine-readable reason
        pa.field("detail", STR),  # human-readable explanation
        pa.field("raw", STR),  # the record as JSON, so nothing is lost
    ]
)

SENTENCE_LABELS = ("conflict", "aligned", "irrelevant")
POSITIONS = ("last", "ctx_last", "ctx_mean", "subject_last")
UNITS = ("sentence", "fact")

SENTENCES = pa.schema(
    [
        pa.field("item_id", STR, nullable=False),
        pa.field("sent_idx", pa.int32(), nullable=False),
        pa.field("key", STR, nullable=False),
        pa.field("text", STR, nullable=False),
        pa.field("char_start", pa.int32(), nullable=False),
        pa.field("char_end", pa.int32(), nullable=False),
        pa.field("relevance", pa.float32()),  # question relevance, when computed
        pa.field("label", STR),  # conflict / aligned / irrelevant, where the benchmark knows it
        pa.field("truthful", pa.bool_()),  # whether the sentence states a true fact, where known
        pa.field("relevant", pa.bool_()),  # whether it bears on this item's question, where the benchmark knows
        pa.field("conflicting", pa.bool_()),  # relevant AND NOT truthful (null when either is): what CLEAR marks
        pa.field("unit", STR),  # "sentence" (a span of the context) or "fact" (an LLM-rewritten atomic fact)
        pa.field("source_idx", pa.int32()),  # index of the context sentence the unit comes from
        pa.field("is_relevant", pa.bool_()),  # kept by the question-step relevance filter, when computed
    ]
)

# One row per (layer, probe kind, position, split). At `last` the rows are statements; at a ctx_* position they
# are the context units with a truth label, read in their context (docs/METHOD.md, "Positions").
PROBE_METRICS = pa.schema(
    [
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("probe", STR, nullable=False),
        pa.field("position", STR, nullable=False),  # one of POSITIONS: where the probe reads the hidden state
        pa.field("split", STR, nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("accuracy", pa.float64()),
        pa.field("f1", pa.float64()),
        pa.field("auroc", pa.float64()),
    ]
)

PRUNINGS = ("none", "filter", "gold")

# Localisation per layer: the flags (p_conflict > threshold) of the flagging kind's per-layer probe (fitted on train,
# the probe of probe_metrics) on the test split's context units, against `conflicting`, per position and pruning:
# none (every unit may be flagged), filter (only units the relevance filter kept), gold (only units the benchmark
# labels relevant: what a perfect filter would keep). n counts the units with a `conflicting` label.
PROBE_LOCALISATION = pa.schema(
    [
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("probe", STR, nullable=False),
        pa.field("position", STR, nullable=False),
        pa.field("pruning", STR, nullable=False),  # one of PRUNINGS
        pa.field("n", pa.int32(), nullable=False),
        pa.field("positives", pa.int32(), nullable=False),
        pa.field("flagged", pa.int32(), nullable=False),
        pa.field("true_flags", pa.int32(), nullable=False),
        pa.field("precision", pa.float64()),  # null: nothing flagged
        pa.field("recall", pa.float64()),  # null: no positive
        pa.field("f1", pa.float64()),  # null: neither
    ]
)

SENTENCE_SCORES = pa.schema(
    [
        pa.field("item_id", STR, nullable=False),
        pa.field("sent_idx", pa.int32(), nullable=False),
        pa.field("key", STR, nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("probe", STR, nullable=False),
        pa.field("p_conflict", pa.float64(), nullable=False),
        pa.field("flagged", pa.bool_(), nullable=False),
        # the probe that scored the unit: "final" (probes/final.safetensors) or "fold-k" (probes/fold-k.safetensors,
        # a cross-fitted probe for train-split items); null in tables written before cross-fitting
        pa.field("scored_by", STR),
    ]
)

PREDICTIONS = pa.schema(
    [
        pa.field("method", STR, nullable=False),
        pa.field("item_id", STR, nullable=False),
        pa.field("prompt", STR, nullable=False),
        pa.field("prediction", STR, nullable=False),
        pa.field("em", pa.float64(), nullable=False),
        pa.field("f1", pa.float64(), nullable=False),
        pa.field("ps", pa.bool_(), nullable=False),  # contains the context answer, no negation, not the original
        pa.field("po", pa.bool_(), nullable=False),  # contains the original (memorised) answer
        # the item's closed-book answer contains its true answer (same value on every method's row of an item);
        # null when closed_book was not evaluated or the item has no true answer (tasks/evaluate/knowledge.py)
        pa.field("known", pa.bool_()),
    ]
)

_METRIC_NAMES = ("em", "f1", "ps", "po", "mr")

KNOWLEDGE = ("all", "known", "unknown")

# One row per method x subset: condition "all" or one of CONDITIONS, knowledge one of KNOWLEDGE; the ("all", "all")
# row of a method is its overall row. EM/F1 are over the subset's n items, p_s/p_o/MR over its counterfactual ones.
METRICS = pa.schema(
    [
        pa.field("method", STR, nullable=False),
        pa.field("condition", STR, nullable=False),
        pa.field("knowledge", STR, nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("n_counterfactual", pa.int32()),  # items p_s/p_o/MR are computed over (null: metrics before it)
    ]
    + [pa.field(f"{m}{s}", pa.float64()) for m in _METRIC_NAMES for s in ("", "_lo", "_hi")]
)

# LFD's layer choice (tasks/evaluate/decoding_lfd.py): one row per decoder layer, its internal knowledge score on the
# dev split and whether it is a candidate (latter half, final layer excluded) or the chosen one; no rows when LFD
# was not evaluated.
LFD_LAYERS = pa.schema(
    [
        pa.field("layer", pa.int32(), nullable=False),  # 0-based decoder block
        pa.field("iks", pa.float64(), nullable=False),  # mean JSD (nats) of the logit lens before vs after the FFN
        pa.field("n_items", pa.int32(), nullable=False),  # dev items the mean is over
        pa.field("candidate", pa.bool_(), nullable=False),
        pa.field("chosen", pa.bool_(), nullable=False),
    ]
)


PAIRED_METRICS = ("ps", "em", "f1", "mr")  # the metrics the comparisons table pairs, headline first
BINARY_METRICS = ("ps", "em")  # per-item 0/1 outcomes: McNemar's exact test applies

# One row per (method, reference, subset, metric): method - reference on the same items. n counts the items the metric
# is over (the subset's counterfactual ones for p_s and MR); diff is the mean per-item difference (MR: the difference
# of the two MRs), lo/hi its paired bootstrap 95% CI; for p_s and EM, the discordant items (method right and reference
# wrong: n_better; the reverse: n_worse) and McNemar's exact two-sided p.
COMPARISONS = pa.schema(
    [
        pa.field("method", STR, nullable=False),
        pa.field("reference", STR, nullable=False),
        pa.field("condition", STR, nullable=False),
        pa.field("knowledge", STR, nullable=False),
        pa.field("metric", STR, nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("diff", pa.float64()),  # null: MR undefined for one of the two (neither answer stated)
        pa.field("lo", pa.float64()),
        pa.field("hi", pa.float64()),
        pa.field("n_better", pa.int32()),
        pa.field("n_worse", pa.int32()),
        pa.field("p_mcnemar", pa.float64()),
    ]
)

# A sweep's aggregate (not a run table: it lives in the sweep directory, over its seed runs' METRICS): one row per
# method x subset x metric, with the mean and sample sd over the seeds where the metric is defined.
SWEEP_METRICS = pa.schema(
    [
        pa.field("method", STR, nullable=False),
        pa.field("condition", STR, nullable=False),
        pa.field("knowledge", STR, nullable=False),
        pa.field("metric", STR, nullable=False),  # em, f1, ps, po or mr: a metric column of METRICS
        pa.field("mean", pa.float64()),  # over the seeds where the metric is defined (null: none)
        pa.field("sd", pa.float64()),  # sample sd (ddof 1); null under two defined values
        pa.field("n_seeds", pa.int32(), nullable=False),  # seeds where the metric is defined
        pa.field("seeds", pa.list_(pa.int64()), nullable=False),  # every seed that evaluated the method, ascending
        pa.field("values", pa.list_(pa.float64()), nullable=False),  # the metric of each of those seeds (null: undefined)
    ]
)

# Tables an analysis command writes into a run (no stage writes them: schemas/layout.py ANALYSES places them).
# `clearflow transfer`: the saved probes of this run scored on the statements of another run (tasks/probes/transfer.py),
# one row per target run x probe file x subset; subset "all" is every target statement, "unseen" those whose subject
# (group, case-folded) and text the probe was never fitted on (its fitted_on splits of this run's statements).
PROBE_TRANSFER = pa.schema(
    [
        pa.field("target_run", STR, nullable=False),
        pa.field("target_dataset", STR, nullable=False),  # dataset of the target run (known-facts: with its version)
        pa.field("probe_file", STR, nullable=False),  # under this run's probes/
        pa.field("probe", STR, nullable=False),  # kind
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("position", STR, nullable=False),
        pa.field("fitted_on", STR, nullable=False),  # "train" (per-layer probes) or "train+dev" (the final probe)
        pa.field("subset", STR, nullable=False),  # all / unseen
        pa.field("n", pa.int32(), nullable=False),
        pa.field("n_conflict", pa.int32(), nullable=False),  # label-1 statements among the n
        pa.field("auroc", pa.float64()),  # null where the subset holds one label only
        pa.field("accuracy", pa.float64()),  # at the probe's threshold
        pa.field("f1", pa.float64()),
        pa.field("source_test_auroc", pa.float64()),  # the same probe on this run's own test statements
    ]
)

# `clearflow entity-positions` (tasks/probes/entity_positions.py): each probe kind fitted per layer on the statements'
# states at the subject's last token and at the statement's last token, on the same statements (those with a subject
# row); metrics per split, as probe_metrics.
ENTITY_POSITIONS = pa.schema(
    [
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("probe", STR, nullable=False),
        pa.field("position", STR, nullable=False),  # last / subject_last
        pa.field("split", STR, nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("accuracy", pa.float64()),
        pa.field("f1", pa.float64()),
        pa.field("auroc", pa.float64()),
    ]
)

ANALYSIS_TABLES: dict[str, pa.Schema] = {"probe_transfer": PROBE_TRANSFER, "entity_positions": ENTITY_POSITIONS}


# A sweep's paired comparisons (sweep directory, over its seed runs' PREDICTIONS): COMPARISONS' rows with every seed's
# answers on an item taken together (tasks/evaluate/seed_pairs.py): per-item scores are means over the seeds.
SWEEP_COMPARISONS = pa.schema(
    [
        *(f for f in COMPARISONS if f.name not in ("n_better", "n_worse", "p_mcnemar")),
        pa.field("n_seeds", pa.int32(), nullable=False),  # seeds that evaluated both methods
        pa.field("n_better", pa.int32()),  # items whose seed-mean score is higher for the method (binary metrics)
        pa.field("n_worse", pa.int32()),  # ... lower
        pa.field("p_exact", pa.float64()),  # exact sign-flip test over items (p_s, EM); McNemar's with one seed
        pa.field("seed_diffs", pa.list_(pa.float64()), nullable=False),  # each seed's own difference (seed order)
        pa.field("seed_p_mcnemar", pa.list_(pa.float64()), nullable=False),  # each seed's McNemar p (null: none)
    ]
)

# Inside-Out knowledge (Gekhman et al. 2025; tasks/insideout/): answer candidates of the dev and test items, each
# scored externally (the model's mean log-probability of the answer's tokens after the closed-book prompt; layer
# null) and internally (a logistic probe's logit on the answer's last-token hidden state, one row per layer).
CANDIDATE_SOURCES = ("true", "alias", "counterfactual", "relation")
SCORERS = ("external", "internal")

INSIDEOUT_SCORES = pa.schema(
    [
        pa.field("item_id", STR, nullable=False),
        pa.field("split", STR, nullable=False),  # dev (chooses the layer) or test (reported)
        pa.field("cand_idx", pa.int32(), nullable=False),
        pa.field("answer", STR, nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),  # the true answer or an alias of it
        pa.field("source", STR, nullable=False),  # one of CANDIDATE_SOURCES
        pa.field("n_tokens", pa.int32(), nullable=False),  # the answer's tokens (what the external score averages)
        pa.field("scorer", STR, nullable=False),  # one of SCORERS
        pa.field("layer", pa.int32()),  # internal: the probed layer; external: null
        pa.field("score", pa.float64(), nullable=False),  # higher = ranked as more likely correct
    ]
)

# K per item and scorer: the fraction of (correct, incorrect) candidate pairs whose correct answer scores strictly
# higher (a tie counts as not ranked correctly); k_star: K = 1 (every pair ranked correctly).
INSIDEOUT_K = pa.schema(
    [
        pa.field("item_id", STR, nullable=False),
        pa.field("split", STR, nullable=False),
        pa.field("scorer", STR, nullable=False),
        pa.field("layer", pa.int32()),  # null for the external scorer
        pa.field("n_correct", pa.int32(), nullable=False),
        pa.field("n_incorrect", pa.int32(), nullable=False),
        pa.field("k", pa.float64(), nullable=False),
        pa.field("k_star", pa.bool_(), nullable=False),
    ]
)

# Per split, scorer and layer: mean K with its item-bootstrap 95% CI, the share of items with K = 1, and (internal rows)
# the hidden-knowledge share (items whose internal K exceeds their external K) and the paired gap internal - external.
INSIDEOUT_LAYERS = pa.schema(
    [
        pa.field("split", STR, nullable=False),
        pa.field("scorer", STR, nullable=False),
        pa.field("layer", pa.int32()),  # null for the external scorer
        pa.field("n_items", pa.int32(), nullable=False),
        pa.field("mean_k", pa.float64(), nullable=False),
        pa.field("mean_k_lo", pa.float64()),
        pa.field("mean_k_hi", pa.float64()),
        pa.field("k_star", pa.float64(), nullable=False),  # share of items with K = 1
        pa.field("hidden_share", pa.float64()),  # internal K > external K; null on external rows
        pa.field("hidden_share_lo", pa.float64()),
        pa.field("hidden_share_hi", pa.float64()),
        pa.field("gap", pa.float64()),  # mean internal K - mean external K over the same items; null on external rows
        pa.field("gap_lo", pa.float64()),
        pa.field("gap_hi", pa.float64()),
        pa.field("l2", pa.float64()),  # the probe's C, chosen on dev; null on external rows
        pa.field("chosen", pa.bool_(), nullable=False),  # the internal layer of best dev mean K (ties: lower layer)
    ]
)


def activations_schema(dim: int, value_type: pa.DataType = pa.float32()) -> pa.Schema:
    """Schema of one activation shard; the layer lives in the hive path, not in the file."""
    return pa.schema(
        [
            pa.field("key", STR, nullable=False),
            pa.field("source", STR, nullable=False),  # statements / sentences
            pa.field("position", STR, nullable=False),  # last, subject_last (text alone) / ctx_last, ctx_mean (in context)
            pa.field("context_key", STR),  # ctx_*: text_key of the context the sentence was read in; last: null
            pa.field("vector", pa.list_(value_type, dim), nullable=False),
        ]
    )


TABLES: dict[str, pa.Schema] = {
    "items": ITEMS,
    "statements": STATEMENTS,
    "rejects": REJECTS,
    "sentences": SENTENCES,
    "probe_metrics": PROBE_METRICS,
    "probe_localisation": PROBE_LOCALISATION,
    "sentence_scores": SENTENCE_SCORES,
    "predictions": PREDICTIONS,
    "metrics": METRICS,
    "comparisons": COMPARISONS,
    "lfd_layers": LFD_LAYERS,
    "insideout_scores": INSIDEOUT_SCORES,
    "insideout_k": INSIDEOUT_K,
    "insideout_layers": INSIDEOUT_LAYERS,
}
