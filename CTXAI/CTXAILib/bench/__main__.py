"""``python -m CTXAILib.bench --child ...``: one benchmark child process, started by :func:`.children.run_child`."""

import sys

from .children import child_main

sys.exit(child_main())
