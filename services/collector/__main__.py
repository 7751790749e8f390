"""`python -m services.collector` runs the collector (env vars in app.py)."""

from .app import main

main()
