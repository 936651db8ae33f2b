"""Prefect flow of the report stage: write report.md and its figures."""

from flows.orchestrate import make_stage_flow

report_flow = make_stage_flow("report")
