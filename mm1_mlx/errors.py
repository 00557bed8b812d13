"""User-facing errors: the CLIs print them as one line and exit with status 2."""

from __future__ import annotations

import functools
import sys


class MM1Error(Exception):
    """A problem with the user's input (file, model, prompt, data), explained in one line."""


def cli_errors(main):
    """Wrap a CLI ``main``: MM1Error / OSError -> one line on stderr, exit code 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except MM1Error as e:
            print(f"error: {e}", file=sys.stderr)
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(2)

    return wrapper
