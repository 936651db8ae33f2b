"""Prefect flow of the finetune stage: LoRA fine-tuning with <conflict> markers and the attention loss."""

from flows.orchestrate import make_stage_flow

finetune_flow = make_stage_flow("finetune")
