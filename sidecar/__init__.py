"""The sidecar: a resilient reverse proxy for MCP Streamable HTTP and legacy HTTP+SSE."""
