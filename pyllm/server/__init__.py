"""The HTTP server behind `pyllm serve`: app (routes, SSE), protocol (OpenAI request/response shapes),
metrics (Prometheus text) and static/ (the chat page)."""
