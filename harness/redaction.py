"""Secrets out of every URI the harness writes down or prints, and a tracking login into the
environment.

A URI can carry a password (`postgresql://user:pw@host/db`, `https://user:pw@host`,
`...?password=pw`). Everything the harness logs, prints, links or stores passes through `redact`.
Clients read credentials from the environment and their own files, so no password needs to stay
in a URI: `login_to_environment` moves an http(s) tracking login to where MLflow reads it.

This module imports no other harness module: the Optuna side (study.py), the MLflow side
(tracking.py) and the command lines all use it.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

# A URI inside any text: a scheme, `://`, then up to whitespace or a quote.
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*")
# `user:password@` right after the scheme. The password runs to the last `@` before the host: a
# SQLAlchemy URL's password may hold `/`, and requests splits userinfo at the last `@`. A port
# followed by a path (`host:5000/a@b`) is not a password.
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):(?!\d*[/?#])[^\s]*@(?=[^@/?#]*(?:[/?#]|$))")
# A query parameter whose name says its value is a secret (sslpassword, api_key, X-Amz-Signature...).
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&;#]*?(?:pass|pwd|secret|token|key|credential|signature)[^=&;#]*=)[^&;#]*", re.IGNORECASE
)
MASK = "***"


def redact(text: str) -> str:
    """`text` with the secrets of every URI in it masked: the password of `user:password@` (the
    user stays), and the value of every password-like query parameter. A URI without secrets, a
    path and any other text come back unchanged.

    >>> redact("postgresql://harness:s3cret@db:5432/optuna?sslmode=require&password=s3cret")
    'postgresql://harness:***@db:5432/optuna?sslmode=require&password=***'
    """
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URI.sub(lambda m: _redact_uri(m.group(0)), text)


def _redact_uri(uri: str) -> str:
    uri = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", uri, count=1)
    return _SECRET_PARAM.sub(lambda m: m.group("name") + MASK, uri)


def redact_config(value: Any) -> Any:
    """A copy of a config (nested dicts, lists, strings) with `redact` applied to every string: the
    storage URL and the tracking URI above all. What a run's config.yaml may hold."""
    if isinstance(value, dict):
        return {k: redact_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_config(v) for v in value)
    return redact(value)


# The variables MLflow reads a tracking server's login from (mlflow/utils/credentials.py).
LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def login_to_environment(uri: str) -> str:
    """Move the `user:password@` of an http(s) tracking URI into MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, where MLflow reads them, and return the URI without them.

    MLflow prints a server's URI as it is (the "View run at" line of every ended run, the URL in
    a failed request's error), so a password left in it would be printed by MLflow itself."""
    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urlsplit(uri)
    if parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))
