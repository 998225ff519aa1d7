"""What the console scripts share: one `error: ...` line and a non-zero exit for every failure a
user can cause, never a traceback (maml-export, maml-predict, maml-bench)."""
from __future__ import annotations

import os
import sys

import click

# Paddle logs INFO/WARNING lines through glog ("New Executor is Running", a warning from inside
# `Tensor.mean`) that would break progress lines and tables; errors still show. Read when paddle loads,
# so this module is imported before anything imports paddle.
os.environ.setdefault("GLOG_minloglevel", "2")


def run(command: click.Command, args: list[str] | None, prog_name: str) -> None:
    """Run a click command: exit 1 on a project error, 2 (click's code) on a usage error, 130 on Ctrl-C."""
    from .errors import MamlError

    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        code = fail("interrupted", 130)
    except click.ClickException as e:  # usage errors: missing option, bad type...
        code = fail(e.format_message(), e.exit_code)
    except (MamlError, ValueError, OSError) as e:
        code = fail(str(e), 1)
    sys.exit(code if isinstance(code, int) else 0)


def fail(message: str, code: int) -> int:
    """Print `error: <message>` on one line (whitespace folded) to stderr; return the exit code."""
    click.echo(f"error: {' '.join(message.split())}", err=True)
    return code
