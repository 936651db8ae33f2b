"""Prefect flow of the decompose stage: split every context into sentences with character offsets."""

from flows.orchestrate import make_stage_flow

decompose_flow = make_stage_flow("decompose")
