"""monotile serve: OpenAI-compatible HTTP serving of runs (app.py), with continuous batching of
generation requests (engine.py)."""
