"""Durable webhooks: sources verified on raw bytes, events committed before the 2xx, delivery
with retries, dead letters and replay. See docs/webhooks.md."""
