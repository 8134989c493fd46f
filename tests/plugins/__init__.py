"""Plug-in modules the tests name in `plugins=` (as a user's own package would)."""
