"""Service discovery: DNS and self-registration."""
