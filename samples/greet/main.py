"""A function in a directory (greet/main.py) using the directory's shared _helpers.py."""

import json
import sys

from _helpers import greeting

event = json.load(sys.stdin)
print(json.dumps({"message": greeting(event.get("name", "world"))}))
