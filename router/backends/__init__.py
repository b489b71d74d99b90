"""Generation backends: the protocol, OpenAI-compatible HTTP, gRPC, local; resilience."""
