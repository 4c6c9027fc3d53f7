"""OpenAI's wire format and the /v1 routes (see server/__init__.py)."""
