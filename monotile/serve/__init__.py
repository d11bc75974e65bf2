"""monotile serve: OpenAI-compatible HTTP serving of runs.

    app.py          the served models, the app, `serve`
    gate.py         the key, the body and time limits, the metrics, errors in OpenAI's shape
    openai_text.py  /v1/completions and /v1/chat/completions (streamed or whole)
    routes.py       embeddings, transcriptions, classifications, forecasts, predictions
    engine.py       continuous batching of generation requests
    schemas.py      the request bodies
    process.py      one server in a subprocess (tests, benches)
"""
