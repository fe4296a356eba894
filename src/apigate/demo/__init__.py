"""The embedded demo: a bundled example config and a tiny upstream, so `apigate run` answers at once."""
