"""The encode service: text-embedding workers (and, next, the vision encoder)."""
