"""Exit-status policy: 0 done, 1 a clear error about input or environment, 2 usage."""

from __future__ import annotations

import sys

import click

from stablediff.errors import UserError


# Errors that speak to the user on their own: no traceback unless --debug.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, PermissionError, OSError)


def run_cli(group: click.Group) -> None:
    from stablediff.training.interrupt import EmergencySaveFailed, TrainingInterrupted  # light: no torch

    debug = "--debug" in sys.argv[1:]
    try:
        status = group.main(standalone_mode=False)
    except TrainingInterrupted as stop:  # SIGTERM/SIGINT: the run stopped at a safe point, nothing lost
        click.echo(str(stop), err=True)
        sys.exit(0)
    except EmergencySaveFailed as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        interrupted = isinstance(exc.__context__, KeyboardInterrupt)  # Ctrl-C outside a run's handlers
        click.echo("interrupted (SIGINT)" if interrupted else "aborted", err=True)
        sys.exit(130 if interrupted else 1)
    except click.ClickException as exc:  # usage errors: bad option, missing argument
        exc.show()
        sys.exit(exc.exit_code)
    except USER_ERRORS as exc:
        if debug:
            raise
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)
