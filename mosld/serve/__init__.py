"""``python -m mosld.serve``: an OpenAI-compatible server for a trained mixture, routed per token as trained.

- ``model``: what is loaded (a run, an adapter folder or a base; precision, device, fixed gates);
- ``engine``: the thread that batches concurrent requests through the one decoder
  (``mosld.evaluation.decoding``, the one training-time evaluation and ``mosld.evaluate`` use);
- ``protocol``: the request bodies and their checks; ``app``: the HTTP routes (FastAPI, run by uvicorn).

The layers know nothing of the server; the server only calls the decoder. Needs ``pip install 'mosld[serve]'``.
"""

from .app import Server, create_app
from .engine import Engine
from .model import ServedModel, load_served_model

__all__ = ["Engine", "ServedModel", "Server", "create_app", "load_served_model"]
