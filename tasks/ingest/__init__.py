"""Stage 1, ingest: dataset files -> items, probe statements and rejects (readers in `formats/`)."""
