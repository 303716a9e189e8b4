"""FnServe: run functions as isolated subprocesses behind HTTP and a CLI.

The library API is what the CLI calls: `run_function` (fnserve run),
`load_registry` (fnserve list), `load_config` + `fnserve.app.create_app` (serve).
"""

__version__ = "0.1.0"

from .config import Config, load_config
from .invoke import run_function
from .registry import load_registry

__all__ = ["Config", "__version__", "load_config", "load_registry", "run_function"]
