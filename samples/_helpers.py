"""Shared code: entries starting with `_` are not functions, and every Python function
of this directory can `import _helpers` (NAME.py runs from here; NAME/main.py gets
this directory on its PYTHONPATH)."""


def greeting(name: str) -> str:
    return f"Hello, {name}!"
