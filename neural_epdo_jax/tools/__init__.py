"""Command-line tools, each ``python -m neural_epdo_jax.tools.<name>``: `evaluate`, `report`,
`export`, `convert`, `study` (with `study_results`)."""
