"""The HTTP gateway: the OpenAI Chat Completions API in front of the Baton mesh."""
