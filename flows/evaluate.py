"""Prefect flow of the evaluate stage: generate answers per method and score them."""

from flows.orchestrate import make_stage_flow

evaluate_flow = make_stage_flow("evaluate")
