"""The HTTP server behind `pyllm serve`: app (routes, SSE), body (reading JSON bodies), protocol
(OpenAI request validation), messages (chat messages), tools (response_format, tools, tool calls),
job_stream (a request's jobs on the event loop), responses and logprobs (response shapes), errors
(OpenAI's error shape), metrics (Prometheus text) and static/ (the chat page)."""
