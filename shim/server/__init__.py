"""The HTTP layer (Flask app) and its serving (waitress on TCP and unix sockets)."""
from .app import create_app

__all__ = ["create_app"]
