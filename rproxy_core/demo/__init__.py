"""Built-in demo web app served by ``rproxy demo``: a small home-automation controller."""

from .homeapp import create_home_app

__all__ = ["create_home_app"]
