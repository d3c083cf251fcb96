"""Invalid values of settings, each with the processes that read that setting: those refuse to start on it, and
every other process starts (each parses only its own settings, chatmesh.runtime.settings.PROCESS_SETTINGS)."""

EVERY_SERVICE = frozenset({"gateway", "dialogue", "safety", "cache"})
EVERY_PROCESS = EVERY_SERVICE | {"modelsim"}

# Variable: (an invalid value, the processes that read it).
BAD_SETTINGS: dict[str, tuple[str, frozenset[str]]] = {
    # Every process's (ProcessSettings): a certificate without its key.
    "CHATMESH_TLS_CERT_FILE": ("/nowhere/cert.pem", EVERY_PROCESS),
    # Every service's (ServiceSettings): review cases kept longer than conversations.
    "CHATMESH_REVIEW_RETENTION_SECONDS": (str(30 * 24 * 3600), EVERY_SERVICE),
    # The gateway's: above its bound, a public key without its certificate, images past one gRPC message.
    "CHATMESH_AUTH_CACHE_SECONDS": ("9", frozenset({"gateway"})),
    "CHATMESH_GATEWAY_TLS_KEY_FILE": ("/nowhere/key.pem", frozenset({"gateway"})),
    "CHATMESH_MAX_IMAGE_BYTES": (str(64 * 1024 * 1024), frozenset({"gateway"})),
    # The model client's (ModelSettings): dialogue, safety and cache.
    "CHATMESH_EMBEDDING_DIMENSIONS": ("9000", frozenset({"dialogue", "safety", "cache"})),
    # The models' context sizes: dialogue and modelsim.
    "CHATMESH_DEFAULT_CONTEXT_TOKENS": ("1", frozenset({"dialogue", "modelsim"})),
    # Dialogue's: below its bound, an overlap of half a (default, 300-token) chunk.
    "CHATMESH_TOOL_MAX_STEPS": ("1", frozenset({"dialogue"})),
    "CHATMESH_KNOWLEDGE_CHUNK_OVERLAP_TOKENS": ("150", frozenset({"dialogue"})),
    # Safety's: an unknown mode, an unknown action.
    "CHATMESH_SAFETY_MODERATION": ("sometimes", frozenset({"safety"})),
    "CHATMESH_REVIEW_POLICY": ('{"fraud": "review"}', frozenset({"safety"})),
    # The cache's: above its bound, answers kept longer than conversations.
    "CHATMESH_SEMANTIC_CACHE_THRESHOLD": ("2", frozenset({"cache"})),
    "CHATMESH_CACHE_TTL_SECONDS": (str(30 * 24 * 3600), frozenset({"cache"})),
    # modelsim's: above its bound, two deployments on one port.
    "CHATMESH_MODELSIM_HANG_RATE": ("2", frozenset({"modelsim"})),
    "CHATMESH_MODELSIM_DEPLOYMENTS": ('[{"port": 9001}, {"port": 9001}]', frozenset({"modelsim"})),
}


def bad_settings_of_others(process: str) -> dict[str, str]:
    """Every invalid value above that `process` does not read."""
    return {variable: value for variable, (value, readers) in BAD_SETTINGS.items() if process not in readers}
