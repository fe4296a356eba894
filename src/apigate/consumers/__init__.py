"""Consumers and their API keys: key material (keys.py), the in-process registry the data plane
reads (registry.py), time windows (windows.py) and the operations behind the CLI (service.py).
"""
