"""Loading from the Hugging Face hub for the hub-backed task configs (glue_*, lm_gsm8k), and the helpers
every task shares when it loads with transformers/datasets.

The libraries themselves retry an unreachable hub for half a minute per file and then fail with pages of
traceback; here an unreachable hub fails at once, before any work, in one ``AssetError`` line that says
what the task needs and which offline task to use instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from experiments.assets import AssetError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_switch() -> str | None:
    """The environment variable that puts the Hugging Face libraries offline, if one does."""
    for var in OFFLINE_VARIABLES:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (``timeout`` seconds at most), or None."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or type(e).__name__}"
    return None


@dataclass
class Hub:
    """Loads from the hub; any failure becomes one AssetError line naming what is needed."""

    names: list[str]  # what the task needs from the hub, for the message
    instead: str  # the offline alternative, for the message, e.g. "task=lm"
    local_only: bool  # an offline switch is set: only the local Hugging Face cache is tried

    @classmethod
    def connect(cls, names: list[str], instead: str) -> Hub:
        """With no offline switch and no connection, fail at once."""
        switch = offline_switch()
        why = None if switch else unreachable()
        hub = cls(names, instead, local_only=switch is not None)
        if why:
            raise AssetError(f"{hub._needs()}, which is unreachable here ({why}): run with internet "
                             f"(or set HF_HUB_OFFLINE=1 to use a local cache), or use {instead} offline")
        return hub

    def load(self, fn):
        """``fn()``, which loads with ``local_files_only=self.local_only`` where the loader takes it."""
        try:
            return fn()
        except (OSError, ValueError) as e:  # ConnectionError, OfflineModeIsEnabled, a missing repo or file
            if self.local_only:
                raise AssetError(f"{self._needs()}, which is unreachable here ({offline_switch()}=1) and not "
                                 f"in the local cache: run with internet, or use {self.instead} offline") from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AssetError(f"{self._needs()}; loading failed: {first}") from None

    def _needs(self) -> str:
        return f"this task needs {' and '.join(self.names)} from the Hugging Face hub"


@contextlib.contextmanager
def quiet():
    """Silence transformers' and datasets' logs and progress bars (load reports, "Loading weights" and
    Map/Saving bars) in every run's output; the previous settings are restored."""
    from datasets.utils import logging as dlog
    from transformers.utils import logging as tlog

    verbosity, t_bar, d_bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if t_bar:
            tlog.enable_progress_bar()
        if d_bar:
            dlog.enable_progress_bar()


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's content (vocabulary, normaliser, special tokens), not its path: a cache key for
    tokenised data. Truncation and padding settings are left out: each call with ``max_length`` rewrites
    them on the backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        blob = json.dumps(spec, sort_keys=True)
    else:
        blob = f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}"
    extra = f"{tokenizer.padding_side}|{tokenizer.model_input_names}|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(f"{blob}|{extra}".encode()).hexdigest()[:32]
