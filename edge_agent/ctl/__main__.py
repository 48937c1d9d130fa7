"""``python -m edge_agent.ctl.cli``."""

import sys

from edge_agent.ctl.cli import main

sys.exit(main())
