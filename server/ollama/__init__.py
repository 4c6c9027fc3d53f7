"""Ollama's native API (`/api/...`) on numbalm's server, for the apps that speak it (Open WebUI,
Continue, Enchanted, the `ollama` client libraries, ...).

- `requests`: Ollama's bodies → the `server.serving.request.GenerationRequest` every wire
  format shares (messages, `options`, `format`, `tools`), the one place that turns their bad
  input into errors;
- `shapes`: Ollama's response objects (chat and generate chunks with their timings in
  nanoseconds, model descriptions for tags/show/ps);
- `routes`: the Blueprint. Generation, embeddings, admission, API keys and metrics are those
  of `/v1` (`server.serving`); errors are Ollama's `{"error": "message"}`.
"""
