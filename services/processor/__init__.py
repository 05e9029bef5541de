"""The OpenAI-compatible processor service: HTTP front door, tokenization and routing."""
