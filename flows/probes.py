"""Prefect flow of the probes stage: train a probe per layer, pick the best on dev, score every context sentence."""

from flows.orchestrate import make_stage_flow

probes_flow = make_stage_flow("probes")
