"""``python -m naclip ...``: the same command line as the ``naclip`` console script."""
import sys

from naclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
