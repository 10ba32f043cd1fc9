"""Exit-status policy: 0 done, 1 a clear error about input or environment, 2 usage."""

from __future__ import annotations

import sys

import click


class UserError(Exception):
    """A problem with the user's input or environment, told in one paragraph."""


# Errors that speak to the user on their own: no traceback unless --debug.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, PermissionError, OSError)


def run_cli(group: click.Group) -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        status = group.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:  # usage errors: bad option, missing argument
        exc.show()
        sys.exit(exc.exit_code)
    except USER_ERRORS as exc:
        if debug:
            raise
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)
