"""Allows ``python -m edge_agent``."""

from edge_agent.agent.cli import main

raise SystemExit(main())
