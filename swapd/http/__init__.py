"""What speaks HTTP to clients: the fast path, the Quart app and the translations."""
