"""Prefect flow of the activations stage: cache last-token hidden states of statements and sentences per layer."""

from flows.orchestrate import make_stage_flow

activations_flow = make_stage_flow("activations")
