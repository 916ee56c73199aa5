"""The Hugging Face hub: whether it can be reached (asked once per process), and offline mode when not.

Left alone, huggingface_hub retries an unreachable hub five times with pauses (half a minute of
"Retrying in 8s" lines) before datasets or transformers give up. lrft asks once, before the first
thing it wants from the hub: with HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, the answer is no at
once; otherwise a TCP connection to the hub's endpoint (or to the HTTPS proxy, when one is set) must
open within CONNECT_TIMEOUT_S. An unreachable hub puts the libraries in offline mode, so what their
local caches hold still loads and anything else fails at once, with lrft's one line saying why.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

CONNECT_TIMEOUT_S = 3.0
_checked: dict[str, str | None] = {}  # "reason": why the hub is unreachable, None when it is reachable


def unreachable_reason() -> str | None:
    """Why the hub cannot be reached (e.g. "HF_HUB_OFFLINE=1"), or None; asked once per process.

    When it cannot be reached, huggingface_hub, transformers and datasets are put in offline mode."""
    if "reason" not in _checked:
        _checked["reason"] = _offline_setting() or _connect_problem()
        if _checked["reason"]:
            _go_offline()
    return _checked["reason"]


def unavailable(what: str, error: Exception) -> str:
    """Why `what` (a hub model or dataset) could not be loaded, in words a user can act on."""
    reason = unreachable_reason()
    if reason:
        return f"the hub is unreachable ({reason}) and {what} is not in the local cache"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"could not load {what} from the hub: {type(error).__name__}{': ' + text if text else ''}"


def _offline_setting() -> str | None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]}"
    return None


def _endpoint() -> tuple[str, int]:
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _connect_problem() -> str | None:
    """None if a TCP connection to the hub (or the proxy in front of it) opens in time, else what failed.

    The attempt runs in a daemon thread so that a slow name lookup, which a socket timeout does not
    bound, cannot hold the command up either."""
    host, port = _endpoint()
    proxy = getproxies().get("https")
    if proxy and not proxy_bypass(host):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = url.hostname or host, url.port or 3128
    outcome: dict[str, BaseException | None] = {}

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            outcome["error"] = None
        except OSError as e:
            outcome["error"] = e

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(CONNECT_TIMEOUT_S + 0.5)
    if "error" not in outcome:
        return f"no connection to {host}:{port} within {CONNECT_TIMEOUT_S:g} s"
    error = outcome["error"]
    if error is None:
        return None
    return f"no connection to {host}:{port}: {getattr(error, 'strerror', None) or error}"


def _go_offline() -> None:
    """Offline mode for huggingface_hub (which transformers asks at every call) and datasets (which
    copies the setting when it is imported, so an already imported datasets is told too)."""
    import sys

    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
