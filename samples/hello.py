"""A function in FnServe's classic style: handler(event, context), run as a script."""

import json
import os
import sys


def handler(event, context):
    name = event.get("name") or context.get("parameters", {}).get("name") or "world"
    greeting = os.environ.get("GREETING", "Hello")
    return {"message": f"{greeting}, {name}!", "request_id": context.get("request_id")}


if __name__ == "__main__":
    event = json.load(sys.stdin)
    ctx = {}
    if "FN_CONTEXT" in os.environ:
        ctx = json.loads(os.environ["FN_CONTEXT"])
    result = handler(event, ctx)
    print(json.dumps(result))
