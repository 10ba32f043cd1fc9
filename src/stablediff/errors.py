"""The user's mistakes, as opposed to our bugs.

An exception of the `UserError` family is raised deliberately where input or
environment is judged (a config key, a data source, a checkpoint, a model file,
a generation request, a path); the command line shows its message as one
paragraph and exits 1. Any other exception is a bug and is shown with its
traceback. Each subclass also keeps the built-in class such errors were raised
as before (ValueError, FileNotFoundError, ...), so callers that catch those keep
working. A check of our own invariant stays a plain ValueError/RuntimeError:
if it fires, it is a bug.
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


class GenerationError(UserError, ValueError):
    """A generation request (size, steps, strength, sampler, init image, mask, LoRA) cannot be served as asked."""


# A path the user named is wrong. These keep the OSError subclass that callers
# and tests already catch (`except FileNotFoundError`), and add the family.

class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named (or a run recorded) does not exist."""


class PathExistsError(UserError, FileExistsError):
    """An output path the user named is already taken, and replacing it was not asked for."""


class NotAFolderError(UserError, NotADirectoryError):
    """A path the user named as a folder (a run directory) is a file."""
