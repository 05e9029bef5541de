"""LLM workers: request handlers, registration, health canaries, engine routes, lifecycle."""
