"""``python -m agent ...`` is ``elastic-agent ...``."""

import sys

from agent.daemon.cli import main

sys.exit(main())
