"""Prefect flow of the finetune stage: one LoRA adapter per fine-tuning arm (CLEAR: markers and the attention loss)."""

from flows.orchestrate import make_stage_flow

finetune_flow = make_stage_flow("finetune")
