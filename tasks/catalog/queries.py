"""Example DuckDB queries an analyst asks of the runs catalog: one source for the README, the tests and `clearflow sql`.

Each query reads the plain views (the latest finished run, or `clearflow sql --run NAME`). Parameters are
written `$name` (DuckDB's named-parameter syntax); `example_sql` inlines them as SQL literals because
`clearflow sql` takes a query string only. Vectors are compared with `list_cosine_similarity`, which takes
both the FLOAT[d] arrays of float32 stores and the FLOAT[] lists DuckDB reads from float16 stores.
Only `position = 'last'` rows (each text fed alone) are used, so added positions never mix in.
"""

from __future__ import annotations

from string import Template

LAYER_SEPARATION = """\
WITH dims AS (  -- one row per (layer, label, dimension) value of every statement vector
    SELECT a.model, a.layer, s.label, generate_subscripts(a.vector, 1) AS i, unnest(a.vector) AS x
    FROM activations a JOIN statements s ON s.key = a.key
    WHERE a.position = 'last'
), centroids AS (  -- the mean conflicting (label 1) and mean aligned (label 0) vector of each layer
    SELECT model, layer, label, list(mean_x ORDER BY i) AS centroid
    FROM (SELECT model, layer, label, i, avg(x) AS mean_x FROM dims GROUP BY ALL)
    GROUP BY ALL
)
SELECT c.model, c.layer, 1 - list_cosine_similarity(c.centroid, a.centroid) AS separation
FROM centroids c JOIN centroids a ON a.model = c.model AND a.layer = c.layer
WHERE c.label = 1 AND a.label = 0
ORDER BY c.model, c.layer"""

NEAREST_STATEMENTS = """\
WITH target AS (  -- the sentence's vector at the layer (a sentence shares its key with identical text)
    SELECT a.model, a.vector
    FROM sentences s JOIN activations a ON a.key = s.key
    WHERE $sentence IN (s.text, s.key) AND a.layer = $layer AND a.position = 'last'
    LIMIT 1
)
SELECT st.text, st.label, list_cosine_similarity(a.vector, t.vector) AS cosine
FROM target t
JOIN activations a ON a.model = t.model AND a.layer = $layer AND a.position = 'last'
JOIN statements st ON st.key = a.key
ORDER BY cosine DESC, st.text
LIMIT 5"""

TOP_FLAGGED = """\
SELECT c.item_id, i.question, s.text AS sentence, c.p_conflict
FROM sentence_scores c
JOIN sentences s ON s.item_id = c.item_id AND s.sent_idx = c.sent_idx
JOIN items i ON i.item_id = c.item_id
WHERE c.flagged
ORDER BY c.p_conflict DESC, c.item_id, c.sent_idx
LIMIT 10"""

TEMPLATE_OVERLAP = """\
SELECT t.item_id, t.question_template, t.sentence_template
FROM items t
WHERE t.split = 'test' AND t.question_template IS NOT NULL AND EXISTS (  -- a fine-tuning item with the same wordings
    SELECT 1 FROM items r
    WHERE r.split = 'train' AND r.question_template = t.question_template
      AND r.sentence_template IS NOT DISTINCT FROM t.sentence_template
)
ORDER BY t.item_id"""

PAIRED_VERDICTS = """\
SELECT c.reference, c.method, c.metric, c.n,
       round(100 * c.diff, 1) AS diff_points, round(100 * c.lo, 1) AS lo, round(100 * c.hi, 1) AS hi, c.p_mcnemar,
       CASE WHEN c.lo IS NULL OR c.hi IS NULL THEN 'no interval'
            WHEN c.lo <= 0 AND c.hi >= 0 THEN 'no measurable effect'
            WHEN c.lo > 0 THEN 'higher' ELSE 'lower' END AS verdict
FROM comparisons c
WHERE c.condition = 'all' AND c.knowledge = 'all'  -- over every item; drop this for the per-subset rows
ORDER BY c.reference, c.method, c.metric"""

EXAMPLES: dict[str, tuple[str, str]] = {
    "layer_separation": (
        "per layer, 1 - cosine between the mean conflicting and the mean aligned statement vector",
        LAYER_SEPARATION,
    ),
    "nearest_statements": (
        "the 5 statements nearest (cosine) to one context sentence, given by its text or key, at a layer",
        NEAREST_STATEMENTS,
    ),
    "top_flagged": (
        "the run's flagged sentences the probe is surest of, with their item's question, highest p_conflict first",
        TOP_FLAGGED,
    ),
    "template_overlap": (
        "test items whose (question wording, sentence wording) pair a train (fine-tuning) item also uses: none expected",
        TEMPLATE_OVERLAP,
    ),
    "paired_verdicts": (
        "every method against each reference over all items: paired difference in points, its 95% CI, McNemar's p"
        " and the report's verdict",
        PAIRED_VERDICTS,
    ),
}

# Values the README shows (a conflicting sentence of the default known-facts benchmark, its probe layer).
README_PARAMS: dict[str, dict[str, str | int]] = {
    "nearest_statements": {"sentence": "The official language of Helsinki is Bulgarian.", "layer": 15},
}


def _literal(value: str | float) -> str:
    """A parameter as a SQL literal (strings quoted with '' escapes), so inlining cannot change the query."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"query parameter {value!r}: expected str, int or float, got {type(value).__name__}")
    return "'" + value.replace("'", "''") + "'" if isinstance(value, str) else repr(value)


def example_sql(name: str, **params: str | float) -> str:
    """The named example with its $parameters inlined; missing or unknown parameters fail by name."""
    if name not in EXAMPLES:
        raise KeyError(f"no example query {name!r}; known: {sorted(EXAMPLES)}")
    template = Template(EXAMPLES[name][1])
    wanted = set(template.get_identifiers())
    if set(params) != wanted:
        raise ValueError(f"example {name!r} takes parameters {sorted(wanted)}, got {sorted(params)}")
    return template.substitute({k: _literal(v) for k, v in params.items()})
