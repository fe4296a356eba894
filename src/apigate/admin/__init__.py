"""The admin plane: its own listener, its own framework (FastAPI), never on the proxy path."""
