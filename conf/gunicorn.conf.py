"""Production gunicorn config for FnServe.

    FNSERVE_FUNCTIONS_DIR=/srv/functions gunicorn -c conf/gunicorn.conf.py fnserve.wsgi:app

Every setting comes from the same Config as `fnserve serve`: FNSERVE_HOST,
FNSERVE_PORT, FNSERVE_CONCURRENCY, FNSERVE_TIMEOUT, FNSERVE_API_KEY, ... beat the
[server] table of DIR/fnserve.toml, which beats the defaults. What it sets:
- bind: FNSERVE_HOST:FNSERVE_PORT (127.0.0.1:8080 unless told otherwise);
- one gthread worker (so the 429 limit and /stats are exact), with threads =
  concurrency + 16, so the limiter answers 429 instead of gunicorn queueing;
- timeout / graceful_timeout from FNSERVE_TIMEOUT / FNSERVE_GRACEFUL_TIMEOUT;
- JSON logs on stderr for gunicorn's own lines and FnServe's (logconfig_dict);
- hooks: drain on SIGTERM and SIGINT, warn when listening on a public address
  without an API key, kill every function process group when a worker exits;
- no control socket (gunicorn >= 25.1 would open one at a shared path).
- gunicorn's own access log is quiet: FnServe's invocation line already carries
  method, function, status, outcome and duration. To have it too (as JSON):
      logconfig_dict["loggers"]["gunicorn.access"]["level"] = "INFO"
Override anything below the import, as in any gunicorn config file.
"""

import os

from fnserve.server import conf_settings

# read in the master at start and again on each SIGHUP; a fnserve.toml broken
# meanwhile is logged, and the last good configuration keeps serving
globals().update(conf_settings(os.environ))
