"""``python -m talkstream ...``: the same command line as ``talkstream ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
