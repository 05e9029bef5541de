"""The processor's HTTP handlers, one module per endpoint family."""
