"""Pretrained weights and tokenizers from the Hugging Face hub: cached, fetched, or refused fast.

open_clip fetches a pretrained tag's weights (and some tokenizers) through huggingface_hub,
which asks the hub for the newest revision even when the file is cached, and retries each
request five times with back-off: without network a missing tag took ~50 s and 46 lines of
warnings before failing. tvtool decides first:

* the file is in the local cache: it is read from there, with huggingface_hub in offline
  mode (no request at all);
* ``HF_HUB_OFFLINE`` is set, or one probe of the hub endpoint (no retries, a few seconds at
  most) fails: the load runs offline too (other cached files still serve) and, if it needs
  the network, fails at once with one line (exit 2) naming the cache to fill and the offline
  alternatives (``NAME:PATH``, a cached ``hf-hub:`` reference);
* otherwise the download runs as open_clip does it; a failure is one line (exit 1).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

from tvtool.errors import InvalidInputError, TvtoolError
from tvtool.models.backend import open_clip

HUB_PROBE_TIMEOUT_S = 5.0
"""How long the one probe of the hub endpoint may take before the hub counts as unreachable."""

# open_clip's default weights file name for a tag whose hf_hub entry names a repository only.
_OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"

_probes: dict[str, str | None] = {}


def _hub() -> ModuleType | None:
    try:
        import huggingface_hub
    except ImportError:  # open_clip then downloads from the tags' URLs itself
        return None
    return huggingface_hub


def hub_cache() -> str:
    """The directory huggingface_hub caches downloads in (``HF_HUB_CACHE``, ``HF_HOME``)."""
    hub = _hub()
    return str(hub.constants.HF_HUB_CACHE) if hub is not None else "~/.cache/huggingface/hub"


def _offline_mode(hub: ModuleType) -> bool:
    # The constant (set from HF_HUB_OFFLINE at import) is what huggingface_hub reads at each
    # request, in every version that has it.
    return bool(getattr(hub.constants, "HF_HUB_OFFLINE", False))


def _cached(hub: ModuleType, repo: str, filename: str) -> bool:
    return isinstance(hub.try_to_load_from_cache(repo, filename), str)


def _safe_alternatives(filename: str) -> list[str]:
    # open_clip prefers a safetensors file beside a pickled one (pretrained._get_safe_alternatives).
    if filename == _OPEN_CLIP_WEIGHTS:
        return ["open_clip_model.safetensors"]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


def tag_weights_cached(architecture: str, tag: str) -> bool:
    """Whether the weights of ``architecture:tag`` are in the local cache (no request)."""
    cfg = open_clip.get_pretrained_cfg(architecture, tag) or {}
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    hub = _hub()
    if hub is None or not cfg.get("hf_hub"):
        url = cfg.get("url", "")
        return bool(url) and os.path.isfile(
            os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))
    repo, filename = os.path.split(cfg["hf_hub"])
    filename = filename or _OPEN_CLIP_WEIGHTS
    return any(_cached(hub, repo, name) for name in [*_safe_alternatives(filename), filename])


def hub_model_cached(repo: str) -> bool:
    """Whether an ``hf-hub:ORG/REPO`` model's config and weights are in the local cache."""
    hub = _hub()
    if hub is None or not _cached(hub, repo, "open_clip_config.json"):
        return False
    return any(_cached(hub, repo, name) for name in
               ("open_clip_model.safetensors", _OPEN_CLIP_WEIGHTS))


def tokenizer_uses_hub(architecture: str) -> bool:
    """Whether open_clip's tokenizer for ``architecture`` is read from the hub."""
    if architecture.startswith("hf-hub:"):
        return True
    config = open_clip.get_model_config(architecture) or {}
    return bool(config.get("text_cfg", {}).get("hf_tokenizer_name"))


def tokenizer_cached(architecture: str) -> bool:
    """Whether a hub tokenizer's files are in the local cache (its config as the witness)."""
    hub = _hub()
    config = open_clip.get_model_config(architecture) or {}
    name = config.get("text_cfg", {}).get("hf_tokenizer_name")
    return hub is not None and bool(name) and _cached(hub, name, "tokenizer_config.json")


def hub_unreachable(hub: ModuleType) -> str | None:
    """Why the hub endpoint cannot be reached (one short line), or None when it answers.

    One request without retries, at most :data:`HUB_PROBE_TIMEOUT_S`; the answer is kept for
    the rest of the process. Any HTTP answer counts as reachable: only the connection matters.
    """
    endpoint = str(hub.constants.ENDPOINT)
    if endpoint not in _probes:
        try:
            hub.get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
            _probes[endpoint] = None
        except Exception as exc:  # any transport error: DNS, refused, timeout, proxy, TLS
            text = " ".join(str(exc).split())[:120] or type(exc).__name__
            _probes[endpoint] = f"{type(exc).__name__}: {text}"
    return _probes[endpoint]


@contextlib.contextmanager
def _offline(hub: ModuleType, on: bool) -> Iterator[None]:
    """huggingface_hub's offline mode for the block (its constant is read at each request)."""
    if not on:
        yield
        return
    previous = hub.constants.HF_HUB_OFFLINE
    hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.constants.HF_HUB_OFFLINE = previous


def _detail(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


@contextlib.contextmanager
def hub_access(what: str, *, cached: bool, hint: str) -> Iterator[None]:
    """Run a block that may read ``what`` from the Hugging Face hub (see the module docs).

    Args:
        what: What is loaded, for the error line (e.g. ``"the weights of ViT-B-32:openai"``).
        cached: Whether it is known to be in the local cache (then no request is made).
        hint: What to do when it cannot be had.

    Raises:
        InvalidInputError: it is neither cached nor reachable (offline mode, or the probe
            failed), or the cached copy cannot be read.
        TvtoolError: the download failed although the hub answered the probe.
    """
    hub = _hub()
    if hub is None:
        yield
        return
    offline_env = _offline_mode(hub)
    reason = None if cached or offline_env else hub_unreachable(hub)
    try:
        with _offline(hub, cached or reason is not None):
            yield
    except (OSError, RuntimeError) as exc:
        if cached:
            raise InvalidInputError(f"cannot load {what} from the local cache: {_detail(exc)}",
                                    hint=hint) from None
        if offline_env:
            raise InvalidInputError(f"cannot load {what}: not in the local cache, and "
                                    "HF_HUB_OFFLINE is set", hint=hint) from None
        if reason is not None:
            raise InvalidInputError(f"cannot download {what}: {hub.constants.ENDPOINT} is "
                                    f"unreachable ({reason})", hint=hint) from None
        raise TvtoolError(f"downloading {what} failed: {_detail(exc)}", hint=hint) from None


def weights_hint(architecture: str) -> str:
    """What to do when a tag's weights cannot be had."""
    name = architecture.removesuffix("-quickgelu")
    return (f"fill the cache {hub_cache()} where the hub is reachable (HF_HUB_CACHE or HF_HOME "
            f"move it), or give a local weights file as {name}:PATH, or an hf-hub:ORG/REPO "
            "model already in that cache")


def tokenizer_hint() -> str:
    """What to do when a hub tokenizer cannot be had."""
    return (f"fill the cache {hub_cache()} where the hub is reachable (HF_HUB_CACHE or HF_HOME "
            "move it); tvtool eval --head FILE needs no tokenizer")

