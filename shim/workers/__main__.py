"""``python -m shim.workers``: one request worker (started by ``WorkerPool``; its config on stdin)."""
import sys

from .front import main

sys.exit(main())
