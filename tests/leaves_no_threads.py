"""Run a program as torchrun starts it (``-m module`` or a script's path, then its arguments), and fail
with exit code 86 if gloo's threads are still running once it has returned.

A process group whose threads outlive the program is destroyed at interpreter exit, which can abort the
process after its work is done (see ``medmax/distributed.py``); that abort happens about 1 time in 20, so the
tests check the cause, which is there every time."""

import runpy
import sys

from medmax.distributed import group_threads


def main() -> int:
    target, *rest = sys.argv[1:]
    if target == "-m":
        module, *rest = rest
        sys.argv = [module, *rest]
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        sys.argv = [target, *rest]
        run = lambda: runpy.run_path(target, run_name="__main__")  # noqa: E731
    code = 0
    try:
        run()
    except SystemExit as exc:
        code = exc.code
    left = group_threads()
    if left:
        print(f"{sys.argv[0]}: gloo threads still running after the program returned: {left}", file=sys.stderr, flush=True)
        return 86
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
