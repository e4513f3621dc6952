"""``python -m shim.up``: the same as ``accelshim up``."""
import argparse
import sys

from . import configure, run

sys.exit(run(configure(argparse.ArgumentParser(prog="accelshim up", description=__doc__)).parse_args()))
