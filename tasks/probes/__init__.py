"""Stage 4, probes: a probe per layer on the statements, the best on dev, p_conflict for every unit."""
