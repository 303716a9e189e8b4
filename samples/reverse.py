"""Takes plain text: its stdin is the request body as sent, JSON or not.

    curl -s localhost:8080/function/reverse -H 'Content-Type: text/plain' -d 'stressed'
    echo stressed | fnserve run samples/reverse.py
"""

import sys

text = sys.stdin.read()
print(text.strip()[::-1])
