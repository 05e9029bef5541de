"""The publisher service: relays each engine's ZMQ KV events and load metrics to NATS."""
