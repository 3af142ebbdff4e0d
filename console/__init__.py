"""The operator console, served by the gateway under /console (see `console/app.py`)."""

from console.app import Wiring, create_app

__all__ = ["Wiring", "create_app"]
