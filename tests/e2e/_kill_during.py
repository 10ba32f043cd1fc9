"""Run `stablediff ARGS...` and SIGKILL it at a chosen instant of its writing: a real process, a real kill.

    python tests/e2e/_kill_during.py FUNCTION MATCH N ARGS...

FUNCTION is `module.attribute` (`os.replace`, `safetensors.torch.save_file`). The process kills itself
just before the N-th call of it whose arguments mention MATCH (a substring of a path; '' matches every
call). It only chooses the instant: the command runs unchanged up to it. The patch is made before
stablediff, diffusers or transformers are imported, so names they bind at import see it too.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def kill_before(target: str, match: str, nth: int) -> None:
    module_name, attribute = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, attribute)
    seen = 0

    def wrapper(*args, **kwargs):
        nonlocal seen
        if any(match in os.fspath(a) for a in args if isinstance(a, (str, os.PathLike))):
            seen += 1
            if seen == nth:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, attribute, wrapper)


if __name__ == "__main__":
    target, match, nth, *args = sys.argv[1:]
    kill_before(target, match, int(nth))
    sys.argv = ["stablediff", *args]
    from stablediff.cli import main

    main()
