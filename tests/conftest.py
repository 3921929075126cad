"""Shared by every test: compiled executables are kept in one persistent cache, so the tests'
runs and the subprocesses they start compile each step once (and reruns not at all)."""

import os
import tempfile

import jax

if jax.config.jax_compilation_cache_dir is None:
    jax.config.update(
        "jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "neural_epdo_jax_tests")
    )
