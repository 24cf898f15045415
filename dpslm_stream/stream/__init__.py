"""Streaming stages and the per-session objects that compose them."""
