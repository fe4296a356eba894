"""The YAML config loader: any text gives a config or a ConfigError, never another exception."""

from __future__ import annotations

import contextlib

import atheris

with atheris.instrument_imports():
    from apigate.config import loader
    from apigate.config.loader import ConfigError, load_config

from fuzz.harness import fuzz


def _no_plugins(plugins: list) -> list:
    return []


def check(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    # `plugins:` names modules to import: fuzzed names would import arbitrary ones. Switched off
    # for this call only, so that a process replaying the corpus (the test suite) keeps plugins.
    load_plugins, loader.load_plugins = loader.load_plugins, _no_plugins
    try:
        with contextlib.suppress(ConfigError):
            load_config(text=text, environ={})
    finally:
        loader.load_plugins = load_plugins


if __name__ == "__main__":
    fuzz(check)
