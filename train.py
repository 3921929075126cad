"""Trains (or evaluates) a Neural ePDO network; all logic lives in neural_epdo_jax.training.

  python train.py                                    # configs/default.py -> runs/default
  python train.py --config=configs/mnist_rot_regular_fd.py --config.num_epochs=10
  python train.py --mode=eval --workdir=runs/default # = python -m neural_epdo_jax.evaluate

Rerunning a command resumes from the latest checkpoint in its workdir (default
runs/<config file stem>); a workdir trained with a different config is refused.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics). Default: runs/<config file stem>."
)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming) or evaluate.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    0,
    "On CPU: JAX devices to split the host into for data parallelism (0: one per core; 1: "
    "none). The result does not depend on it beyond float summation order.",
    lower_bound=0,
)
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Where compiled steps are kept between runs (default ~/.cache/neural_epdo_jax/xla, "
    "'' to keep none): a rerun with the same model and shapes loads them instead of compiling.",
)


def _unknown_key_exit(error: Exception) -> None:
    """Exits with a short message for a --config.<key> override that the config lacks."""
    message = str(error.args[0] if error.args else error).strip("'\"").replace("\\n", "\n")
    sys.exit(
        f"train.py: unknown config key in a --config.<key>=<value> override: {message}\n"
        "The config is locked: only keys its file defines can be overridden (see the "
        "config file, e.g. configs/default.py)."
    )


try:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", "configs/default.py", "Training configuration file.", lock_config=True
    )
except (AttributeError, KeyError) as e:  # Overrides are parsed here when --config is absent.
    _unknown_key_exit(e)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        _unknown_key_exit(e)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Progress goes to stdout; orbax logs a lot.
    # Imported here so that --help and flag errors do not wait for JAX.
    from neural_epdo_jax import checkpointing, datasets, evaluate, parallel, training

    parallel.use_cpu_cores(_CPU_DEVICES.value)  # before JAX starts
    training.use_compilation_cache(_CACHE.value)

    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    stem = os.path.splitext(os.path.basename(config_file))[0]
    workdir = _WORKDIR.value or os.path.join("runs", stem)
    try:
        if _MODE.value == "eval":
            evaluate.run(workdir)
            return
        result = training.train_and_evaluate(_CONFIG.value, workdir)
    except (
        training.ConfigError,
        training.NonFiniteLossError,
        checkpointing.IncompatibleWorkdirError,
        checkpointing.NoCheckpointError,
        datasets.DataError,
    ) as e:
        sys.exit(f"train.py: error: {e}")
    print(training.summary_line(result), flush=True)


if __name__ == "__main__":
    from neural_epdo_jax import hostmem

    hostmem.reexec_with_huge_pages()  # faster CPU steps; before anything else starts
    app.run(main, flags_parser=_parse_flags)
