//! HTTP routes, OpenAI types, SSE and errors.
