"""The HTTP server behind `pyllm serve`: app (routes, SSE), run (uvicorn, make_server), body (reading JSON bodies), protocol
(OpenAI request validation), messages (chat messages), tools (response_format, tools, tool calls),
job_stream (a request's jobs on the event loop; LocalEngine), responses and logprobs (response
shapes), errors (OpenAI's error shape), metrics (Prometheus text), static/ (the chat page), and for
--replicas on Ray Serve: ray_engine (routing to replicas), ray_replica (one engine as a deployment)
and ray_launch (the Ray session and the deployments)."""
