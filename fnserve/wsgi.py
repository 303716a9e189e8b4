"""The app for `gunicorn -c conf/gunicorn.conf.py fnserve.wsgi:app` and `flask --app fnserve.wsgi`.

Serves FNSERVE_FUNCTIONS_DIR with the settings from FNSERVE_* and fnserve.toml:
the same frozen Config that `fnserve serve` builds from its flags.
"""

from __future__ import annotations

import logging.config
import os
import sys

from .app import create_app
from .config import load_config
from .logs import logging_config

config = load_config(None, {}, os.environ)
if "gunicorn" not in sys.modules:  # under gunicorn, its logconfig_dict (conf/) sets logging up
    logging.config.dictConfig(logging_config(config.log_format))
app = create_app(config)
