"""The model: the one client that calls it (`client`) and how a call fails (`errors`), its deployments and the
router that picks one (`deployments`, `router`), what its tokens cost (`pricing`) and its metrics (`metrics`). Used
by the processes that call a model: dialogue (chat), safety (moderation) and cache (embeddings); never by the
gateway."""
