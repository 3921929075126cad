"""Study files for `python -m neural_epdo_jax.tools.study`: one ``get_config()`` per file."""
