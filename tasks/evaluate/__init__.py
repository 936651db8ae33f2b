"""Stage 6, evaluate: every method's answers on the same items, scored from one predictions table."""
