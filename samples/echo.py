"""Echoes the event and the context it was called with."""

import json
import os
import sys

event = json.load(sys.stdin)
print(json.dumps({"event": event, "context": json.loads(os.environ["FN_CONTEXT"])}))
