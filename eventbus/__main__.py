"""``python -m eventbus run package.module:bus [--grace S] [--workers N] [--reload] [--url U]``.

Only ``run`` for now; the full CLI replaces :func:`main`'s dispatch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "run":
        sys.stderr.write(
            "usage: python -m eventbus run package.module:bus [--grace S] [--workers N]"
            " [--reload] [--url URL]\n"
        )
        return 2
    from ._runner import parse_run_args, run
    from .errors import ConfigurationError

    kwargs = parse_run_args(args[1:])
    try:
        return run(**kwargs)
    except ConfigurationError as exc:
        sys.stderr.write(f"eventbus run: {exc}\n")
        return 2
    except KeyboardInterrupt:  # before serving began (while importing the target)
        return 130


if __name__ == "__main__":
    sys.exit(main())
