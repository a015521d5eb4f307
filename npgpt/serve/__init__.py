"""npgpt serve: OpenAI's HTTP API over one model, its requests decoded together in batch-invariant steps
(kernels, batched, engine: the decoding; protocol, chat_format, app: the HTTP side)."""
