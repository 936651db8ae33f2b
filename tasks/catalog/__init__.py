"""The analyst's side: a read-only DuckDB catalog over every run's tables and the tested example queries."""
