"""Stage 3, activations: hidden states of statements and context units, cached in the shared store."""
