"""The HTTP layer (Flask app) and its serving (waitress on TCP, unix and vsock sockets)."""
from .app import create_app

__all__ = ["create_app"]
