"""``python -m eventbus``: the ``eventbus`` command (``eventbus/_cli``)."""

from __future__ import annotations

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
