"""HTTP API: TGI- and OpenAI-compatible routes over the engine."""
