"""Reject reasons of the `rejects` table (REJECTS.reason): one constant each, so readers, suites and tests
name them exactly."""

MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_QUESTION = "empty_question"
EMPTY_CONTEXT = "empty_context"
EMPTY_ANSWERS = "empty_answers"
DUPLICATE_ID = "duplicate_id"
UNDECODABLE = "undecodable"
CONTEXT_TOO_LONG = "context_too_long"
SAME_ANSWER = "same_answer"
NOT_AN_OBJECT = "not_an_object"
MALFORMED_JSON = "malformed_json"
MISALIGNED = "misaligned"
QUESTION_TOO_LONG = "question_too_long"
RESERVED_MARKER = "reserved_marker"  # the text holds the <conflict> tags the marking methods add
# known-facts (and MQuAKE prompts that cannot be filled in)
EMPTY_FIELD = "empty_field"
UNKNOWN_RELATION = "unknown_relation"
DUPLICATE = "duplicate"
NO_COUNTERFACTUAL = "no_counterfactual"
UNFORMABLE_SENTENCE = "unformable_sentence"

REASONS = (
    MISSING_FIELD, WRONG_TYPE, EMPTY_QUESTION, EMPTY_CONTEXT, EMPTY_ANSWERS, DUPLICATE_ID, UNDECODABLE,
    CONTEXT_TOO_LONG, SAME_ANSWER, NOT_AN_OBJECT, MALFORMED_JSON, MISALIGNED, QUESTION_TOO_LONG, RESERVED_MARKER,
    EMPTY_FIELD, UNKNOWN_RELATION, DUPLICATE, NO_COUNTERFACTUAL, UNFORMABLE_SENTENCE,
)
