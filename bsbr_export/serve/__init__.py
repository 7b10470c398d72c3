"""``bsbr-export serve``: an OpenAI-compatible completions server with continuous batching.

``scheduler`` (one loop thread owns the engine and a batch of rows; ``request``: what it takes
and gives back), ``app`` (the FastAPI application, its middleware and lifecycle, and ``run``),
``server`` (what every route reads: ``ServeConfig``, ``Server``, ``server_of``, error
responses), one module per route family (``completions``, ``chat``, ``status``), ``protocol``
(the request models, OpenAI-style errors), ``metrics`` (Prometheus), ``ray_app`` (the same
application on Ray Serve), ``bench`` (the serving benchmark).
Needs the ``serve`` extra: ``pip install 'bsbr-export[serve]'``.
"""
