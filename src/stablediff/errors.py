"""The user's mistakes, as opposed to our bugs.

An exception of the `UserError` family is raised deliberately where input or
environment is judged (a config key, a data source, a checkpoint, a model file);
the command line shows its message as one paragraph and exits 1. Any other
exception is a bug and is shown with its traceback. The subclasses are also
ValueErrors, so callers that catch ValueError keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, told in one paragraph that says what to do."""


class ConfigError(UserError, ValueError):
    """The config file or an override is wrong; the message says how."""


class DataError(UserError, ValueError):
    """The data cannot be used as asked."""


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be saved or loaded as asked; the message says why and what to do."""


class ModelFileError(UserError, ValueError):
    """A model file (single file, diffusers folder, LoRA, embedding) cannot be read or written as asked."""
