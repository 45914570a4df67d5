"""A requests Session for the OTLP/HTTP exporter that keeps the configured CA certificate.

The exporter puts ``OTEL_EXPORTER_OTLP_CERTIFICATE`` on ``Session.verify``, but
requests replaces that on every request with ``REQUESTS_CA_BUNDLE`` or
``CURL_CA_BUNDLE`` when either is set (requests#3829). Many images and CI
runners set them to the system bundle, so a collector behind a private CA
became unreachable over HTTPS while the same settings worked over gRPC. This
session keeps the certificate it was given; everything else requests takes from
the environment (proxies, ``NO_PROXY``) is unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_CERTIFICATE,
    OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE,
)

__all__ = ["PinnedVerifySession", "pinned_session_if_configured"]

CREDENTIAL_PROVIDER_VARIABLES = ("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
                                 "OTEL_PYTHON_EXPORTER_OTLP_HTTP_METRICS_CREDENTIAL_PROVIDER")
"""A session from one of these is the user's to configure; otel_llm leaves it alone."""


class PinnedVerifySession(requests.Session):
    """A Session whose ``verify`` is not overridden by ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``."""

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None:  # the exporter never passes one per request: the session's own applies
            settings["verify"] = self.verify
        return settings


def pinned_session_if_configured() -> PinnedVerifySession | None:
    """The session to hand the exporter when an OTLP certificate is set and no credential provider is."""
    certificate = os.environ.get(OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE) or os.environ.get(
        OTEL_EXPORTER_OTLP_CERTIFICATE)
    if not certificate or any(os.environ.get(name) for name in CREDENTIAL_PROVIDER_VARIABLES):
        return None
    return PinnedVerifySession()
