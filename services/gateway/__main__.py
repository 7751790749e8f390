"""`python -m services.gateway` runs the OpenAI-compatible HTTP gateway (env vars in app.py)."""

from .app import main

main()
