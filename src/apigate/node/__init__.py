"""The node: what one machine's gateway processes share, run once whatever the number of workers
(active health checks, discovered targets, the admin listener), and the link every worker keeps
to it."""
