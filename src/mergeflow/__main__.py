"""`python -m mergeflow` = the `mergeflow` command."""

import sys

from mergeflow.cli import main

# Guarded: a spawned child process (vLLM's engine core) re-imports this module.
if __name__ == "__main__":
    sys.exit(main())
