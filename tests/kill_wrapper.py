"""Run the robal CLI with one function patched so that its N-th call SIGKILLs the process: an exact kill point
instead of a timed one. KILL_TARGET=module:attribute (e.g. torch.optim:SGD.step, os:fsync), KILL_AT=N.

    python tests/kill_wrapper.py train CONFIG --out RUN ...
"""
import importlib
import os
import signal
import sys

module, _, attr = os.environ["KILL_TARGET"].partition(":")
owner_path, _, name = attr.rpartition(".")
owner = importlib.import_module(module)
for part in filter(None, owner_path.split(".")):
    owner = getattr(owner, part)
real, calls, at = getattr(owner, name), [0], int(os.environ["KILL_AT"])


def counted(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)


setattr(owner, name, counted)
from robal.cli import main  # noqa: E402 (after the patch, so that robal's modules see it)

sys.exit(main(sys.argv[1:]))
