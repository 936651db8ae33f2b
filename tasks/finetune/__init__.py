"""Stage 5, finetune: conflict-aware LoRA with <conflict> markers and the last-layer attention loss."""
