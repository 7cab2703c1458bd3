"""The front door: the `iterserve` command line and the OpenAI-compatible HTTP server.

Owns argument parsing, HTTP (FastAPI + uvicorn), SSE streaming, the engine thread's
bridge to the event loop (`async_engine`), and metrics exposition. It validates,
translates and forwards: it never schedules, touches KV blocks or calls torch, and
it reaches the engine only from the engine's own thread (read-only checks aside).
"""
