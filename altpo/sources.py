"""Where a model, tokenizer or data set comes from: a local path, or a Hugging Face hub id.

One rule for every command. A hub id is ``owner/name`` (letters, digits, ``_ . -``) that is not
spelled as a path and does not exist on disk. Anything else is a local path, so a mistyped folder
name is reported as missing at once instead of after the hub's retries.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_local_path(source) -> bool:
    """True for an existing path, or a name spelled as a path (``./x``, ``/x``, ``~/x``, ``a/b/c``,
    or ``parent/x`` whose parent folder exists)."""
    text = str(source)
    if os.path.exists(os.path.expanduser(text)):
        return True
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        return True
    parent = os.path.dirname(text)
    return bool(parent) and os.path.isdir(parent)


def looks_like_hub_id(source) -> bool:
    """``owner/name`` that is not a local path: a Hugging Face hub repository id."""
    return not is_local_path(source) and HUB_ID.match(str(source)) is not None


def local_path(source) -> Path:
    return Path(os.path.expanduser(str(source)))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds (False when
    ``HF_HUB_OFFLINE`` is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    port = 80 if endpoint.startswith("http://") else 443
    if ":" in host:
        host, port = host.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        return False
    return True
