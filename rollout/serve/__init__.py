"""`blockrl serve`: an OpenAI-compatible HTTP server over the engine's step-level core, with continuous batching
across concurrent requests (docs/serve.md)."""
