"""chatmesh: a chatbot backend for backend services, one gRPC API in front of an OpenAI-compatible model."""
