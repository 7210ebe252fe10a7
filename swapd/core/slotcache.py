"""Warm return: a model's prompt caches survive a swap.

The hidden cost of a swap is not the load, it is the conversation that must be
processed again from its first token when the person comes back. For profiles that keep
their cache, swapd starts llama-server with a ``--slot-save-path`` of the profile's own,
saves every slot that holds a prompt before the model is stopped
(``POST /slots/{id}?action=save``) and restores them after it is loaded again, before
any waiting request is served (``?action=restore``). llama-server then reuses the
restored prefix: a returning conversation only processes its new tokens.

One ``SlotCache`` owns the files under ``state_dir/slots`` and their index:

* each profile's files live in a directory named by a hash of its name (names never
  become paths) and are tagged with a fingerprint of the profile's definition: a
  different model file, context or flag makes them useless, so they are dropped;
* a save is skipped when writing and reading it back would take longer than processing
  its tokens again (the model's prompt speed comes from llama-server's own timing lines,
  the disk's speed from earlier saves); the decision is logged with its numbers;
* ``cache.budget`` bounds the disk used, the least recently used files going first;
* a restore that llama-server rejects is logged and skipped, never fatal;
* a full or read-only disk is never fatal either: the failed write is counted in
  ``errors`` (warned once), and a model that cannot get its cache directory starts
  without one.

Saving and restoring run in the supervisor's start and stop tasks, which are the only
callers; the index is small JSON written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import attrs
import httpx
import trio

from swapd.config import Config, Profile
from swapd.core.statedir import WriteErrors

log = logging.getLogger(__name__)

DEFAULT_DISK_BPS = 200e6
"""Assumed disk speed until a save or restore has measured it."""

SLOT_TIMEOUT = 120.0
"""Longest one save or restore may take."""


class _Child(Protocol):
    name: str
    client: httpx.AsyncClient
    prompt_tps: float | None


@attrs.define
class Outcome:
    """What one save or restore did, for the log, status and metrics."""

    slots: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: list[str] = attrs.field(factory=list)


class SlotCache:
    def __init__(self, root: Path, config: Config, errors: WriteErrors | None = None) -> None:
        self.root = root
        self.config = config
        self.errors = errors if errors is not None else WriteErrors()
        self.stats = {"saves": 0, "restores": 0, "bytes_saved": 0, "bytes_restored": 0,
                      "tokens_restored": 0, "seconds_saved": 0.0, "rejected": 0,
                      "skipped": 0, "evicted": 0}
        self._disk_bps: float | None = None
        self._index_path = root / "index.json"
        self._index: dict[str, dict[str, Any]] = self._read_index()

    # -- which profiles, where --

    def keeps(self, profile: Profile) -> bool:
        return self.config.cache.keep if profile.keep_cache is None else profile.keep_cache

    def directory(self, profile: Profile) -> Path:
        return self.root / hashlib.sha256(profile.name.encode()).hexdigest()[:16]

    def argv(self, profile: Profile) -> list[str]:
        """Extra llama-server arguments for ``profile`` (none if it keeps no cache)."""
        if not self.keeps(profile):
            return []
        try:
            self.directory(profile).mkdir(parents=True, exist_ok=True)
        except OSError as error:  # the model still serves, only without warm return
            self.errors.failed("slot_cache", self.directory(profile), error)
            return []
        return ["--slot-save-path", str(self.directory(profile))]

    def fingerprint(self, profile: Profile) -> str:
        """Changes whenever saved caches would no longer fit the loaded model."""
        try:
            stat = profile.model.stat()
            model = f"{profile.model}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            model = str(profile.model)
        flags = json.dumps(dict(profile.flags), sort_keys=True, default=str)
        command = json.dumps(list(self.config.llama_server.command))
        return hashlib.sha256(f"{model}\0{flags}\0{command}".encode()).hexdigest()[:16]

    def saved(self, profile: Profile) -> dict[str, Any]:
        """The index entry of a profile's files, dropped if its definition changed."""
        entry = self._index.get(profile.name)
        if entry is not None and entry.get("fingerprint") != self.fingerprint(profile):
            log.info("dropping saved caches of %s: its definition changed", profile.name)
            self._drop(profile.name)
            entry = None
        return entry or {}

    # -- save and restore --

    async def save(self, proc: _Child, profile: Profile) -> Outcome:
        """Save every slot worth saving; called with the model idle, before it stops."""
        outcome = Outcome()
        if not self.keeps(profile):
            return outcome
        try:
            slots = (await proc.client.get("/slots", timeout=10)).json()
        except (httpx.HTTPError, ValueError) as error:
            log.warning("cannot list %s's slots to save them: %s", profile.name, error)
            return outcome
        entry = self.saved(profile)
        files: dict[str, Any] = dict(entry.get("slots", {}))
        for slot in slots if isinstance(slots, list) else ():
            slot_id = slot.get("id")
            tokens = int(slot.get("n_prompt_tokens") or 0)
            why_not = self._not_worth_it(proc, profile, tokens, files.get(str(slot_id)))
            if why_not:
                outcome.skipped.append(why_not)
                self.stats["skipped"] += 1
                continue
            filename = f"slot{slot_id}.bin"
            began = time.monotonic()
            try:
                response = await proc.client.post(
                    f"/slots/{slot_id}?action=save", json={"filename": filename},
                    timeout=SLOT_TIMEOUT)
                result = response.json()
            except (httpx.HTTPError, ValueError) as error:
                log.warning("saving slot %s of %s failed: %s", slot_id, profile.name, error)
                continue
            if response.status_code != 200:
                log.warning("llama-server would not save slot %s of %s: %s", slot_id,
                            profile.name, response.text[:200])
                continue
            seconds = time.monotonic() - began
            written = int(result.get("n_written") or 0)
            self._learn_disk(written, seconds)
            files[str(slot_id)] = {"file": filename, "tokens": int(result.get("n_saved") or 0),
                                   "bytes": written, "used": time.time()}
            outcome.slots += 1
            outcome.tokens += files[str(slot_id)]["tokens"]
            outcome.bytes += written
            outcome.seconds += seconds
        if outcome.slots:
            self._index[profile.name] = {"fingerprint": self.fingerprint(profile),
                                         "slots": files}
            self.stats["saves"] += outcome.slots
            self.stats["bytes_saved"] += outcome.bytes
            self._evict_over_budget()
            await self._write_index()
            log.info("saved %d slot(s) of %s: %d tokens, %.1f MB in %.0f ms", outcome.slots,
                     profile.name, outcome.tokens, outcome.bytes / 1e6, 1000 * outcome.seconds)
        for why in outcome.skipped:
            log.info("not saving a slot of %s: %s", profile.name, why)
        return outcome

    def restorable(self, profile: Profile) -> tuple[int, int]:
        """(slots, bytes) a restore of ``profile`` would read: for progress messages."""
        files = self.saved(profile).get("slots", {}) if self.keeps(profile) else {}
        return len(files), sum(int(f.get("bytes", 0)) for f in files.values())

    async def restore(self, proc: _Child, profile: Profile) -> Outcome:
        """Load the saved slots into a freshly started model, before it serves anyone."""
        outcome = Outcome()
        if not self.keeps(profile):
            return outcome
        files: dict[str, Any] = self.saved(profile).get("slots", {})
        for slot_id, info in sorted(files.items()):
            began = time.monotonic()
            try:
                response = await proc.client.post(
                    f"/slots/{slot_id}?action=restore", json={"filename": info["file"]},
                    timeout=SLOT_TIMEOUT)
            except httpx.HTTPError as error:
                log.warning("restoring slot %s of %s failed: %s", slot_id, profile.name, error)
                continue
            if response.status_code != 200:
                # A different build, a smaller context, a missing file: start cold.
                log.warning("llama-server rejected the saved slot %s of %s (%s); it starts "
                            "cold", slot_id, profile.name, response.text[:200])
                self.stats["rejected"] += 1
                continue
            result = response.json()
            seconds = time.monotonic() - began
            read = int(result.get("n_read") or 0)
            tokens = int(result.get("n_restored") or 0)
            self._learn_disk(read, seconds)
            info["used"] = time.time()
            outcome.slots += 1
            outcome.tokens += tokens
            outcome.bytes += read
            outcome.seconds += seconds
        if outcome.slots:
            self.stats["restores"] += outcome.slots
            self.stats["bytes_restored"] += outcome.bytes
            self.stats["tokens_restored"] += outcome.tokens
            if proc.prompt_tps:
                self.stats["seconds_saved"] += max(
                    0.0, outcome.tokens / proc.prompt_tps - outcome.seconds)
            await self._write_index()
            log.info("restored %d slot(s) of %s: %d tokens, %.1f MB in %.0f ms",
                     outcome.slots, profile.name, outcome.tokens, outcome.bytes / 1e6,
                     1000 * outcome.seconds)
        return outcome

    def status(self) -> dict[str, Any]:
        on_disk = sum(int(f.get("bytes", 0)) for e in self._index.values()
                      for f in e.get("slots", {}).values())
        return {**self.stats, "bytes_on_disk": on_disk, "budget": self.config.cache.budget,
                "profiles": {name: {"slots": len(e.get("slots", {})),
                                    "tokens": sum(f.get("tokens", 0)
                                                  for f in e.get("slots", {}).values())}
                             for name, e in self._index.items()}}

    # -- decisions and bookkeeping --

    def _not_worth_it(self, proc: _Child, profile: Profile, tokens: int,
                      previous: dict[str, Any] | None) -> str | None:
        if tokens < self.config.cache.min_tokens:
            return f"{tokens} tokens (< cache.min_tokens {self.config.cache.min_tokens})"
        if not proc.prompt_tps or not previous or not previous.get("tokens"):
            return None  # nothing to go by yet: save, and learn
        bytes_per_token = previous["bytes"] / previous["tokens"]
        size = tokens * bytes_per_token
        disk = self._disk_bps or DEFAULT_DISK_BPS
        cost = 2 * size / disk  # written now, read back later
        benefit = tokens / proc.prompt_tps
        if cost > benefit:
            return (f"{tokens} tokens re-process in ~{benefit:.2f}s at "
                    f"{proc.prompt_tps:.0f} tok/s, but saving and restoring "
                    f"{size / 1e6:.0f} MB at {disk / 1e6:.0f} MB/s takes ~{cost:.2f}s")
        return None

    def _learn_disk(self, size: int, seconds: float) -> None:
        if size > 1_000_000 and seconds > 0:
            bps = size / seconds
            self._disk_bps = bps if self._disk_bps is None else 0.7 * self._disk_bps + 0.3 * bps

    def _evict_over_budget(self) -> None:
        files = sorted(((info.get("used", 0), name, slot_id, info)
                        for name, entry in self._index.items()
                        for slot_id, info in entry.get("slots", {}).items()),
                       key=lambda item: item[0])
        total = sum(int(info.get("bytes", 0)) for *_, info in files)
        for _used, name, slot_id, info in files:
            if total <= self.config.cache.budget:
                break
            directory = self.root / hashlib.sha256(name.encode()).hexdigest()[:16]
            self._unlink(directory / info["file"])
            del self._index[name]["slots"][slot_id]
            total -= int(info.get("bytes", 0))
            self.stats["evicted"] += 1
            log.info("dropped saved slot %s of %s (cache.budget)", slot_id, name)

    def _drop(self, name: str) -> None:
        entry = self._index.pop(name, None) or {}
        directory = self.root / hashlib.sha256(name.encode()).hexdigest()[:16]
        for info in entry.get("slots", {}).values():
            self._unlink(directory / info["file"])

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            self.errors.failed("slot_cache", path, error)

    def _read_index(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._index_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    async def _write_index(self) -> None:
        await trio.to_thread.run_sync(self._write_index_sync)

    def _write_index_sync(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self._index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._index, indent=1, sort_keys=True))
            tmp.replace(self._index_path)
        except OSError as error:
            self.errors.failed("slot_cache", self._index_path, error)
        else:
            self.errors.succeeded("slot_cache")
