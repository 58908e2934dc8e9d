"""Entry point for ``python -m slm_trainer`` and the ``slm-trainer`` console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run one stage, return the process exit code (see slm_trainer.cli)."""
    from slm_trainer.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
