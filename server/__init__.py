"""The front door: the `iterserve` command line and, later, the OpenAI-compatible HTTP server.

Owns argument parsing, HTTP, streaming and metrics exposition; it validates and
translates, and leaves scheduling and tensors to `scheduler/` and `engine/`.
"""
