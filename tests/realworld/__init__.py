"""Real-world test suite: tiny versions of popular models through the public API (issues 11 and 12)."""
