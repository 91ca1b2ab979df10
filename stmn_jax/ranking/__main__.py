"""`python -m stmn_jax.ranking ...`: see `stmn_jax.ranking.cli`."""

from __future__ import annotations

import sys

from stmn_jax.ranking.cli import main

if __name__ == "__main__":
  sys.exit(main())
