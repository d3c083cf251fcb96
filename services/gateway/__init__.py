"""gateway: the public ChatService; validation, request ids, deadlines, relaying dialogue's stream."""
