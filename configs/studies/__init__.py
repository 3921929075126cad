"""Study files for `python -m neural_epdo_jax.study`: one ``get_config()`` per file."""
