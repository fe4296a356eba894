"""apigate: a self-hosted API gateway and webhook handler."""

__version__ = "0.1.0"
