"""``python -m harmonica``: the ``harmonica`` command line."""

import sys

from .cli import main

sys.exit(main())
