"""`python -m engine.tune HOOKS [flags]`: a study; `python -m engine.tune worker - N`: a worker."""

import sys

from engine.tune.cli import main

if __name__ == "__main__":
    sys.exit(main())
