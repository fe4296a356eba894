"""Configuration: YAML → typed models → one immutable compiled snapshot."""
