"""Talking to a tracking server (http, https): credentials, waiting, and what its refusals mean.

A server is waited for at most --server-wait seconds, at the start and on every request during
a run (MLflow's own retries, sized to that wait). Credentials come from MLFLOW_TRACKING_USERNAME
and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN); a user:password in the URI is moved
there, so the password is never printed or logged.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import urllib.parse

from .errors import TwmlError

SERVER_WAIT_S = 30.0  # how long a tracking server that does not answer is waited for (--server-wait)

context: dict[str, str] = {}  # the experiment being written to, for the messages of refused requests


def is_server(uri: str) -> bool:
    """Whether the store is a tracking server reached over HTTP(S)."""
    return uri.split("://")[0].lower() in ("http", "https")


def without_credentials(uri: str) -> str:
    """The URI without a user:password part; they go where MLflow's client reads them
    (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD), so no message, param or report
    ever shows the password."""
    if not is_server(uri):
        return uri
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    credentials, host = parts.netloc.rsplit("@", 1)
    user, _, password = credentials.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(password)
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def retry_within(wait: float) -> None:
    """Size MLflow's retries of each request so that they give up after about `wait` seconds:
    urllib3 sleeps 0, 2, 4, ... 2^(r-1) seconds between r tries (backoff factor 1, MLflow
    takes whole numbers only), (2^r - 2) s in all. An explicit MLFLOW_HTTP_REQUEST_* setting wins."""
    retries = max(1, round(math.log2(wait + 2)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(30, math.ceil(wait))))


def wait_for_server(uri: str, wait: float) -> None:
    """Return once the server answers (any HTTP status will do: it is up); say at once that it
    is being waited for, and give up after `wait` seconds with one line."""
    import requests

    start, said = time.monotonic(), False
    while True:
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=max(1.0, min(5.0, wait)))
            return
        except requests.RequestException as err:
            why = reason(err)
            if time.monotonic() - start + 1 >= wait:
                raise TwmlError(
                    f"the tracking server {uri} did not answer within {wait:g} s ({why}); start it, check the "
                    "address, or wait longer with --server-wait"
                ) from None
            if not said:
                print(f"twml: waiting up to {wait:g} s for the tracking server {uri} ({why})", file=sys.stderr)
                said = True
            time.sleep(1)


def reason(err: BaseException) -> str:
    text = str(err)
    for pattern, why in (
        ("Connection refused", "connection refused"),
        ("Name or service not known|nodename nor servname|Failed to resolve", "unknown host"),
        ("timed out|Timeout", "no answer"),
        ("SSL|certificate", "TLS failed"),
    ):
        if re.search(pattern, text):
            return why
    return type(err).__name__


def refused(err: BaseException, uri: str) -> str | None:
    """The message for a request the tracking server refused (401, 403) or never answered;
    None for other errors."""
    text = str(err)
    code = getattr(err, "error_code", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED" or re.search(r"error code 401\b", text):
        given = f"user '{user}' with this password" if user else "no user name and password"
        return (
            f"the server {uri} refused these credentials (401 Unauthorized: {given}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of this server"
        )
    if code == "PERMISSION_DENIED" or re.search(r"error code 403\b", text):
        where = f"experiment '{context['experiment']}'" if "experiment" in context else "this experiment"
        endpoint = re.search(r"endpoint (\S+)", text)
        reads = endpoint is not None and re.search(r"/(get|search|list)", endpoint.group(1)) is not None
        verb, need = ("read", "READ") if reads else ("write to", "EDIT")
        return (
            f"the server {uri} refused these credentials (403 Permission denied): user '{user or '?'}' may not "
            f"{verb} {where}; ask its owner or an admin for {need} permission, or choose another --experiment"
        )
    if unreachable(err, uri):
        return f"the tracking server {uri} stopped answering ({reason(err)}) and did not come back within the wait"
    return None


def unreachable(err: BaseException, uri: str) -> bool:
    """Whether the error is a tracking server that does not answer (not one that said no)."""
    text = str(err)
    return is_server(uri) and bool(
        re.search(r"Max retries exceeded|Connection refused|ConnectionError|timed out|RemoteDisconnected", text)
    )
