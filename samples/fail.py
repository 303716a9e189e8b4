"""Always fails: writes to stderr and exits 3 (HTTP 502 function_failed)."""

import sys

print("something went wrong in fail.py", file=sys.stderr)
sys.exit(3)
