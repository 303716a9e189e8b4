"""Custom-timeout example: uses the deadline FnServe passes in the context."""

import json
import os
import sys
import time


def handler(event, context):
    # Get deadline from context
    deadline = context.get("deadline", 30)

    # Use 80% of the deadline, at most the requested seconds (default 1)
    work_time = min(deadline * 0.8, float(event.get("seconds", 1)))
    time.sleep(work_time)

    return {
        "message": f"Completed work in {work_time} seconds",
        "deadline": deadline,
        "request_id": context.get("request_id", "unknown"),
    }


if __name__ == "__main__":
    event = json.load(sys.stdin)
    ctx = {}
    if "FN_CONTEXT" in os.environ:
        ctx = json.loads(os.environ["FN_CONTEXT"])
    result = handler(event, ctx)
    print(json.dumps(result))
