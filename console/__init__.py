"""The operator console, served by the gateway under /console (see `console/app.py`)."""

from console.app import create_app

__all__ = ["create_app"]
