"""Trains (or evaluates) a Neural ePDO network; all logic lives in neural_epdo_jax.train.

  python train.py                                    # configs/default.py -> runs/default
  python train.py --config=configs/mnist_rot_regular_fd.py --config.num_epochs=10
  python train.py --mode=eval --workdir=runs/default # = python -m neural_epdo_jax.tools.evaluate

Rerunning a command resumes from the latest checkpoint in its workdir (default
runs/<config file stem>); a workdir trained with a different config is refused.
Exit codes: 0 done, 1 error (one line), 3 non-finite loss, 128 + N stopped by signal N
(checkpoint saved; the last line says how to resume).
"""

import os
import shlex
import signal
import sys

from absl import app, flags
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Several processes (with --config.distributed=True): host:port of process 0's "
    "coordinator. Default: detected (e.g. SLURM).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Several processes: how many (default: detected).", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Several processes: this one's index (default: detected).", lower_bound=0
)
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Where compiled steps are kept between runs (default ~/.cache/neural_epdo_jax/xla, "
    "'' to keep none): a rerun with the same model and shapes loads them instead of compiling.",
)


EXIT_NON_FINITE = 3


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
    except flags.Error as e:  # e.g. --config.batch_size=abc
        sys.exit(f"train.py: error: {e}")
    except Exception as e:  # noqa: BLE001 -- whatever the --config file raised
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "--config")
        _config_error_exit(path, e)


def _config_error_exit(path: str, error: BaseException) -> None:
    """Exits with one line: the innermost cause of a config file's failure to load."""
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    reason = (str(error).strip().splitlines() or [""])[-1]
    sys.exit(f"train.py: error: cannot load config file {path}: {type(error).__name__}: {reason}")


def _load_config():
    """The --config file's config with its overrides, or exit with one line naming the
    problem (a missing file, an error in it)."""
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    if not os.path.isfile(path):
        sys.exit(
            f"train.py: error: config file {path} does not exist; configs/ has: "
            + ", ".join(
                sorted(f for f in os.listdir("configs") if f.endswith(".py") and f[0] != "_")
            )
            if os.path.isdir("configs")
            else f"train.py: error: config file {path} does not exist."
        )
    try:
        return _CONFIG.value
    except Exception as e:  # noqa: BLE001 -- whatever the config file raised
        _config_error_exit(path, e)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here so that --help and flag errors do not wait for JAX.
    from neural_epdo_jax.runtime.host import setup_host

    setup_host(cpu_devices=_CPU_DEVICES.value, compilation_cache=_CACHE.value)
    from neural_epdo_jax.data import sources
    from neural_epdo_jax.tools import evaluate
    from neural_epdo_jax.train import checkpointing, workdir_lock
    from neural_epdo_jax.train.loop import (
        NonFiniteLossError,
        initialize_distributed,
        train_and_evaluate,
    )
    from neural_epdo_jax.train.metrics import summary_line
    from neural_epdo_jax.train.state import ConfigError

    config = _load_config() if _MODE.value == "train" else None
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(value is not None for value in explicit):
        if config is None or not config.distributed:
            sys.exit(
                "train.py: error: --coordinator_address/--num_processes/--process_id need "
                "--config.distributed=True."
            )
        initialize_distributed(*explicit)

    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    stem = os.path.splitext(os.path.basename(config_file))[0]
    workdir = _WORKDIR.value or os.path.join("runs", stem)
    try:
        if _MODE.value == "eval":
            evaluate.run(workdir)
            return
        result = train_and_evaluate(config, workdir)
    except NonFiniteLossError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(EXIT_NON_FINITE)
    except (
        ConfigError,
        checkpointing.IncompatibleWorkdirError,
        checkpointing.NoCheckpointError,
        checkpointing.UnreadableWorkdirError,
        sources.DataError,
        workdir_lock.WorkdirLockedError,
    ) as e:
        sys.exit(f"train.py: error: {e}")
    print(summary_line(result), flush=True)
    if result["interrupted"]:
        name = signal.Signals(result["signal"]).name
        command = shlex.join(["python", *sys.argv])
        print(
            f"train.py: stopped by {name} at step {result['step']}, checkpoint saved; exit "
            f"code {128 + result['signal']}. To resume, rerun: {command}",
            flush=True,
        )
        sys.exit(128 + result["signal"])


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
