"""What every discovery endpoint says about a profile, computed once per config.

Clients size their prompts from the advertised context, so it must be the context one
request really gets: llama-server splits ``ctx-size`` (else the training context from the
GGUF header) between its slots unless the cache is unified
(:func:`swapd.estimate.slot_context` has the rules). This is the computed value; once a
child has loaded, the supervisor knows the one it reports and the routes prefer that.
Reading headers is file I/O, so the catalog is built off the event loop, at start and at
reload, never per request.
"""

from __future__ import annotations

import logging
import os

import attrs

from swapd.config import Config, Fallback, Profile
from swapd.estimate import Estimate, LayoutCache, ModelLayoutError, estimate_profile, slot_context

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096
"""Advertised when neither the profile nor a readable model file says (documented)."""



def resolve_tagged(config: Config, name: str) -> tuple[str, Profile | Fallback | None]:
    """``name`` as Ollama's clients write it: a profile, alias or fallback, or that with
    ``:latest`` (Ollama's default tag); the name that resolved, and what it names."""
    for candidate in (name, name.removesuffix(":latest")):
        resolved = config.resolve(candidate)
        if resolved is not None:
            return candidate, resolved
    return name, None

@attrs.frozen
class ModelEntry:
    profile: Profile
    context_length: int  # per request (per slot), computed from the flags
    architecture: str
    file_size: int
    modified: float
    model_name: str | None
    estimate: Estimate | None = None
    slots: int = 1

    @property
    def name(self) -> str:
        return self.profile.name


def build_catalog(config: Config) -> dict[str, ModelEntry]:
    layouts = LayoutCache()  # profiles sharing a GGUF read its header once
    return {name: _entry(profile, layouts) for name, profile in config.profiles.items()}


def _entry(profile: Profile, layouts: LayoutCache) -> ModelEntry:
    architecture, ctx_train, size, modified, model_name = "llama", None, 0, 0.0, None
    try:
        layout = layouts.get(profile.model)  # the estimate below reuses this read
        stat = os.stat(profile.model)
    except (OSError, ModelLayoutError) as error:
        log.debug("no GGUF metadata for %s: %s", profile.name, error)
    else:
        architecture = layout.architecture or architecture
        ctx = layout.get("context_length")
        name = layout.metadata.get("general.name")
        ctx_train = ctx if isinstance(ctx, int) else None
        size, modified = stat.st_size, stat.st_mtime
        model_name = name if isinstance(name, str) else None
    slot = slot_context(profile.flags, ctx_train)
    return ModelEntry(
        profile=profile,
        context_length=slot.per_request or DEFAULT_CONTEXT,
        architecture=architecture,
        file_size=size,
        modified=modified,
        model_name=model_name,
        estimate=estimate_profile(profile, cache=layouts),
        slots=slot.slots,
    )
