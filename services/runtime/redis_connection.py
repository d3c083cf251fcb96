"""How every process connects to Redis: the credentials and TLS files of the settings, for any URL."""

from typing import Any

from chatmesh.runtime.settings import ServiceSettings


def connection_options(settings: ServiceSettings, url: str) -> dict[str, Any]:
    """Keyword arguments for `Redis.from_url(url, ...)`. Credentials in the URL itself win over
    CHATMESH_REDIS_USERNAME and CHATMESH_REDIS_PASSWORD; the TLS files apply to rediss:// URLs only."""
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = "required"
        if settings.redis_tls_ca_file:
            options["ssl_ca_certs"] = settings.redis_tls_ca_file
        if settings.redis_tls_cert_file:
            options["ssl_certfile"] = settings.redis_tls_cert_file
            options["ssl_keyfile"] = settings.redis_tls_key_file
    return options
