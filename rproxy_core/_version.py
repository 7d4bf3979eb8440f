"""The library's version, in a module of its own so that any part can read it without importing the package face
(``rproxy_core/__init__.py`` imports the agent and the bridge, which would make a cycle)."""

__version__ = "0.1.0"
