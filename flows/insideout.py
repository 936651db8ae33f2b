"""Prefect flow of the insideout stage: external vs internal knowledge K per item and layer (off by default)."""

from flows.orchestrate import make_stage_flow

insideout_flow = make_stage_flow("insideout")
