"""`edgelm serve`: an OpenAI-compatible HTTP server over edgelm's artifacts (the `edgelm[serve]` extra).

    app = edgelm.serve.create_app({"llama": edgelm.load("llama-q4")})   # an ASGI app
    uvicorn.run(app, host="127.0.0.1", port=8000)                        # or mount it in your own

Endpoints: GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings,
GET /health, POST /tokenize and /detokenize. Each model has one worker thread and a bounded
queue; different models run in parallel; a client that leaves stops its generation.
"""

from edgelm.serve.app import create_app

__all__ = ["create_app"]
