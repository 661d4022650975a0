"""The OpenAI-compatible server (`tessera serve`): FastAPI + uvicorn, the engine on its own thread."""
