"""What the console scripts share: one `error: ...` line and a non-zero exit for every failure a
user can cause, never a traceback (maml-train, maml-export, maml-predict, maml-bench).

Exit codes, as click's: 2 for a usage error (click's own, and a `ConfigError`: options out of range or
contradicting each other), 1 for a failure at run time (missing data, an unwritable --out, a corrupt
checkpoint...), 130 on Ctrl-C."""
from __future__ import annotations

import os
import sys

import click

# How to get onnxruntime's CUDA and TensorRT providers, from a checkout or a wheel alike: onnxruntime-gpu in
# place of onnxruntime, never beside it (both install the module `onnxruntime`, and uninstalling either
# one of a pair deletes files of the other; see https://onnxruntime.ai/docs/install/). Uninstalling both
# first makes the command right from any state; pip skips the one that is not installed.
GPU_REQUIREMENT = "onnxruntime-gpu>=1.21"
GPU_INSTALL = f'pip uninstall -y onnxruntime onnxruntime-gpu && pip install "{GPU_REQUIREMENT}"'


def run(command: click.Command, args: list[str] | None, prog_name: str) -> None:
    """Run a click command under `process.configure()`'s settings (the commands import Paddle inside, after
    them): exit 1 on a project error, 2 (click's code) on a usage error, 130 on Ctrl-C."""
    from .errors import ConfigError, MamlError
    from .process import configure

    configure()

    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        code = fail("interrupted", 130)
    except click.ClickException as e:  # usage errors: missing option, bad type...
        code = fail(e.format_message(), e.exit_code)
    except ConfigError as e:  # an option's value: a usage error, as click's own checks are
        code = fail(str(e), 2)
    except (MamlError, ValueError, OSError) as e:
        code = fail(str(e), 1)
    sys.exit(code if isinstance(code, int) else 0)


def fail(message: str, code: int) -> int:
    """Print `error: <message>` on one line (whitespace folded) to stderr; return the exit code."""
    click.echo(f"error: {' '.join(message.split())}", err=True)
    return code


def checkpoint_argument(value: str | None) -> str | None:
    """--checkpoint as the CLIs read it: a run folder means its calibrated bundle.npz, which training on an image
    folder ends with, while it is the bundle of the run's best.npz; else best.npz, the checkpoint chosen on
    validation (not latest.npz, wherever training stopped); anything else as given."""
    if value is None or not os.path.isdir(value):
        return value
    best = os.path.join(value, "best.npz")
    if not os.path.isfile(best):
        from .errors import CheckpointError
        raise CheckpointError(f"--checkpoint {value}: the run folder has no best.npz yet (no validation so far); "
                              f"pass {os.path.join(value, 'latest.npz')} for its latest weights")
    bundle = os.path.join(value, "bundle.npz")
    if os.path.isfile(bundle) and _iteration(bundle) == _iteration(best):
        return bundle
    return best


def _iteration(checkpoint: str) -> int | None:
    """The iteration a checkpoint's .json beside it records (None if unreadable)."""
    import json
    try:
        with open(os.path.splitext(checkpoint)[0] + ".json") as f:
            return json.load(f)["iteration"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
