"""The data plane: listener, exchanges, upstream pool and router. Knows no policy."""
