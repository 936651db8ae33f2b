"""Stage 2, decompose: contexts -> units (sentences or LLM atomic facts) with offsets and relevance."""
