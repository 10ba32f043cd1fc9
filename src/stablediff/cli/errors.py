"""Exit-status policy: 0 done, 1 the user's mistake told in one paragraph, 2 usage, 70 a bug in stablediff."""

from __future__ import annotations

import shlex
import sys
import traceback

import click

from stablediff.errors import UserError

# Errors that speak to the user on their own: one paragraph, no traceback unless --debug.
# OSError is among them: what the operating system refuses (a missing file, permission
# denied, a full disk, a read-only folder) is the user's environment, its message names
# the errno and the path, and the fix is theirs; a traceback would only bury that line.
# Our own checks on user paths raise the UserError family (MissingPathError, ...) anyway.
USER_ERRORS = (UserError, OSError)

EX_SOFTWARE = 70  # sysexits.h: an internal software error, so scripts can tell a bug from a mistake


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
    except Exception:  # anything else was not judged to be the user's mistake: it is our bug
        traceback.print_exc()
        click.secho(bug_report(sys.argv), fg="red", err=True)
        sys.exit(EX_SOFTWARE)
    sys.exit(status if isinstance(status, int) else 0)


def bug_report(argv: list[str]) -> str:
    """The line after a bug's traceback: what it is and what a report needs."""
    command = shlex.join(["stablediff", *argv[1:]])
    return (f"This is a bug in stablediff, not a mistake in your input. Please report it with the command "
            f"line ({command}), the output of `stablediff --version` and the traceback above.")
