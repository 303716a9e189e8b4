"""The app for `gunicorn -c conf/gunicorn.conf.py fnserve.wsgi:app` and `flask --app fnserve.wsgi`.

Serves FNSERVE_FUNCTIONS_DIR with the settings from FNSERVE_* and fnserve.toml:
the same frozen Config that `fnserve serve` builds from its flags. Under the
shipped conf, a worker started while fnserve.toml is broken keeps the master's
last good configuration instead of failing to load (which would stop gunicorn).
"""

from __future__ import annotations

import logging.config
import os
import sys

from .logs import logging_config
from .server import wsgi_app

if "gunicorn" not in sys.modules:  # under gunicorn, its logconfig_dict (conf/) sets logging up
    from .config import load_config

    logging.config.dictConfig(logging_config(load_config(None, {}, os.environ).log_format))
app = wsgi_app(os.environ)
