"""``bsbr-export serve``: an OpenAI-compatible completions server with continuous batching.

``scheduler`` (one loop thread owns the engine and a batch of rows), ``app`` (the FastAPI
application and ``run``), ``protocol`` (the request model, OpenAI-style errors), ``metrics``
(Prometheus), ``ray_app`` (the same application on Ray Serve), ``bench`` (the serving benchmark).
Needs the ``serve`` extra: ``pip install 'bsbr-export[serve]'``.
"""
