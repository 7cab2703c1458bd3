"""Load generation and reports against OpenAI-compatible servers, over HTTP only."""
