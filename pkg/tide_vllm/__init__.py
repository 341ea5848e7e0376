"""tide-vllm: one stable chat endpoint in front of a vLLM server."""
