"""The state store: events and cached states, in SQLite or Redis, opened from a URL."""
