"""Never finishes: it shows the deadline. Its timeout is 2s (fnserve.toml), so it is
killed after 2 s with its whole process group: 504 `timeout` over HTTP, exit 124
from `fnserve run`."""

import time

while True:
    time.sleep(1)
