"""Shared machinery every stage builds on: configuration, storage, models and chat rendering, text
normalisation, sentence splitting, prompts and markers, the activation store and the quality checks.
Nothing here imports a stage package (docs/ARCHITECTURE.md, "Layers")."""
