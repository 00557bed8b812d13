"""An OpenAI-compatible chat server with images: ``python -m mm1_mlx.server --model M``.

``app`` holds the HTTP routes (Starlette), ``schema`` the request checks, ``scheduler`` the model
thread that batches decode steps across requests. Needs the ``server`` extra (starlette, uvicorn).
"""
