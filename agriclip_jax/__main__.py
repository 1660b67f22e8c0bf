"""`python -m agriclip_jax` is the `agriclip` command."""

import sys

from agriclip_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
