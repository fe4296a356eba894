"""What the gateway shows of itself, beyond the engine's own counters: the access log, usage
analytics, the live event stream and trace spans. Each is an ``Observer`` (observe/base.py) that
the process builds once, applies to every (re)loaded config, and whose hook the engine calls for
every finished exchange."""
