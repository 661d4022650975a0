"""The OpenAI-compatible server (`tessera serve`): FastAPI + uvicorn, the engine in its own process."""
