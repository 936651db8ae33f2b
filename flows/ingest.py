"""Prefect flow of the ingest stage: build items, probe statements and rejects from the dataset."""

from flows.orchestrate import make_stage_flow

ingest_flow = make_stage_flow("ingest")
