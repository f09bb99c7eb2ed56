"""Online serving: ``GET /feed`` (user vector -> ANN candidates -> ranker -> re-ranker) and ``POST /events``.

Modules, each with one job (import them directly; this package imports nothing, so the light
modules such as ``cache`` do not pull in torch and FAISS):

- ``config``    ``ServingConfig`` (YAML section ``serving``)
- ``pipeline``  ``FeedService``: the feed and event logic as plain calls
- ``state``     the user store (histories, seen items) and the serving log sink
- ``cache``     user-vector cache (memory | Redis)
- ``rerank``    MMR, per-publisher cap, freshness boost, seen removal
- ``metrics``   Prometheus counters and histograms
- ``app``       FastAPI routes over ``FeedService``; the uvicorn factory
- ``demo``      start the real server in a subprocess and make the demo calls
"""
