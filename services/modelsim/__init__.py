"""modelsim: an OpenAI-compatible HTTP model simulator with settable latency and injected faults."""
