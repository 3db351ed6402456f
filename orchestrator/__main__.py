"""``python -m orchestrator``: the command-line entry point."""

from orchestrator.cli import main

raise SystemExit(main())
