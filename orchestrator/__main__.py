"""``python -m orchestrator``: the command-line entry point."""

import logging
import os
import sys

from orchestrator import cli

code = cli.main()
if cli.PROMPT_EXIT:  # signalled and checkpointed: no slow teardown (see cli.PROMPT_EXIT)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
