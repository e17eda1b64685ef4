"""What train.py and translate.py share: expected failures end in one line, not a traceback."""

import sys

from mini_gpt2 import DownloadError


def run(main):
    try:
        sys.exit(main())
    except (DownloadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
