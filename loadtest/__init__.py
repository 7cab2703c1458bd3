"""Load generation and reports against OpenAI-compatible servers, over HTTP only.

Owns `iterserve bench`: the requests of a run (`trace`), prompts of exact token lengths
(`prompts`), the streaming client that times them (`client`), the numbers (`metrics`)
and the figures (`plots`). It must not import engine/, scheduler/, kvcache/ or server/:
it measures iterserve exactly as it measures any peer, through the wire.
"""
