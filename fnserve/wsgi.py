"""The app for `gunicorn -c conf/gunicorn.conf.py fnserve.wsgi:app` and `flask --app fnserve.wsgi`.

Serves FNSERVE_FUNCTIONS_DIR with the settings from FNSERVE_* and fnserve.toml:
the same frozen Config that `fnserve serve` builds from its flags. Under the
shipped conf, a worker started while fnserve.toml is broken keeps the master's
last good configuration instead of failing to load (which would stop gunicorn).
"""

from __future__ import annotations

import logging
import logging.config
import os

from .app import get_state
from .errors import ConfigError
from .logs import logging_config
from .server import startup_error, wsgi_app

try:
    app = wsgi_app(os.environ)
except ConfigError as exc:  # no FNSERVE_FUNCTIONS_DIR, a broken fnserve.toml: one line
    startup_error(exc)

if not logging.getLogger("fnserve").handlers:
    # not under gunicorn (whose logconfig_dict from conf/ has set logging up already):
    # `flask run` logs the invocation lines and the functions' stderr like serve does
    logging.config.dictConfig(logging_config(get_state(app).config.log_format))
