"""medjax entry point.

    python -m medjax.main --config=configs/dinov2_reg.py:demo --workdir=runs/demo [--config.key=value ...]
    python -m medjax.main --config=configs/dinov2_reg.py:demo --dry_run   # what it would do, and how long

``config.mode`` picks the trainer. Mistakes a user can make (a bad config value,
an unwritable workdir, a checkpoint of another model) end with one sentence on
stderr and exit status 2; ``--traceback`` shows the full trace instead.
"""

from __future__ import annotations

import importlib
import os
import sys

# Before TensorFlow (imported by CLU's writers) or XLA print start-up chatter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/dinov2_reg.py:demo.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots (resumes if present).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of an error.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config with each key's meaning, the data, the "
                             "schedule and an ETA (medjax/dry_run.py), then exit without training.")


# Explicit registry: config.mode -> the job's trainer module (one folder of medjax/ per job), each with
# ``run(config, workdir)``. Imported when chosen, so a job loads only what it needs.
TRAINERS = {
    "pretrain": "medjax.pretrain.trainer",
    "linear_probe": "medjax.probe.trainer",
    "finetune": "medjax.finetune.trainer",
    "segment": "medjax.segment.trainer",
    "mae": "medjax.mae.trainer",
}


class UsageError(ValueError):
    """A mistake in how medjax was called."""


def _check_workdir(workdir: str | None) -> str:
    if not workdir:
        raise UsageError("No --workdir given; pass --workdir=DIR for checkpoints, logs and plots.")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"Cannot create --workdir {workdir!r} ({e.strerror}); choose a writable directory.")
    if not os.access(workdir, os.W_OK):
        raise UsageError(f"--workdir {workdir!r} is not writable; choose a writable directory.")
    return workdir


def _user_errors():
    """Exception types whose message is meant for the user (no traceback)."""
    from medjax import checkpoint, distributed
    from medjax.reporting import NonFiniteLossError

    return (ValueError, FileNotFoundError, checkpoint.CheckpointMismatchError, NonFiniteLossError,
            distributed.DistributedSetupError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    try:
        config = _CONFIG.value
        if config is None:
            raise UsageError("No --config given; e.g. --config=configs/dinov2_reg.py:demo.")
        try:
            config.mode  # a config file that failed to load raises on first use
        except OSError as e:
            raise UsageError(_flag_error(e, sys.argv)) from None
        if config.mode not in TRAINERS:
            raise UsageError(f"Unknown config.mode {config.mode!r}; choose one of {', '.join(TRAINERS)}.")
        if _DRY_RUN.value:  # --workdir optional: without one the demo data goes to a temporary folder
            from medjax import dry_run

            dry_run.run(config, flags.FLAGS["config"].config_filename,
                        _check_workdir(_WORKDIR.value) if _WORKDIR.value else None)
            return
        workdir = _check_workdir(_WORKDIR.value)
        if "distributed" in config:  # a trainer that runs over several processes: connect them first
            from medjax import distributed

            distributed.initialize_from_environment(config.distributed)
        importlib.import_module(TRAINERS[config.mode]).run(config, workdir)
    except _user_errors() as e:
        if _TRACEBACK.value:
            raise
        from medjax import console

        if not console.raised_by_medjax(e):
            print("medjax: an error was raised inside a library medjax calls, not by medjax's own checks; "
                  "this is probably a bug: please report it with the traceback below.", file=sys.stderr)
            raise
        print(f"medjax: error: {e}", file=sys.stderr)
        sys.exit(2)



def _flag_error(e: Exception, argv: list[str]) -> str:
    """One sentence for a failure while parsing flags (config file, variant, overrides)."""
    if isinstance(e, AttributeError):  # an override names a key the config does not have
        key = str(e).strip("\"'")
        flag = next((a.split("=")[0] for a in argv if a.split("=")[0].endswith("." + key)), key)
        return f"{flag} names no key of the config; check its spelling against the config file."
    if isinstance(e, flags.IllegalFlagValueError) and "parsing config file" not in str(e):
        return str(e).splitlines()[0]  # e.g. a value of the wrong type; names the flag
    cause = e.__context__ if isinstance(e, flags.Error) and e.__context__ is not None else e
    if isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if isinstance(cause, OSError):
        missing = next((line for line in lines if "No such file" in line), lines[-1] if lines else "")
        return f"Cannot load the --config file: {missing}."
    last = lines[-1] if lines else type(cause).__name__
    return last.split(": ", 1)[1] if last.startswith(("ValueError: ", "KeyError: ", "TypeError: ")) else last


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every parse failure is the user's input
        print(f"medjax: error: {_flag_error(e, argv)}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
