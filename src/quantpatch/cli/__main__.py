"""``python -m quantpatch.cli``: the ``quantpatch`` command, without the runpy warning that
``python -m quantpatch.cli.main`` prints (the package has already imported that module)."""

import sys

from quantpatch.cli import main

sys.exit(main())
