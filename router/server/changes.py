"""Change notices between replicas: a hot swap on one reaches every other.

Replicas of one deployment share the model directory, the data directory and the state store
(``server.state``). When an Admin call changes what a replica serves (a model loaded or rolled
back, the rules reloaded, a collection reloaded), that replica publishes a notice on the
store's ``changes`` channel; every other replica applies the same change from the shared
files: the model version named in the notice (already checked by the replica that loaded
it), the configuration file's rules, the collection's newest version. Applying runs off the
event loop, then swaps atomically, so requests keep being served throughout.

A notice can be missed (the store down for a while, a replica starting): on every
(re)subscription a replica also compares the shared ACTIVE model pointers with what it serves
and catches up. With the in-process store there are no other replicas and nothing to send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from router.plexus import Plexus
from router.state.types import StateUnavailable

log = logging.getLogger("plexus.changes")

CHANNEL = "changes"
RESUBSCRIBE_SECONDS = 1.0


@dataclass(frozen=True)
class Change:
    """One notice: ``kind`` is ``model`` (``version`` now active), ``rules`` or ``collection``
    (``collection`` reloaded) of ``tenant``, sent by the replica ``origin``."""

    origin: str
    tenant: str
    kind: str
    version: str = ""
    collection: str = ""


class ChangeNotices:
    """Publishes this replica's changes and applies the others'."""

    def __init__(self, plexus: Plexus, run_off_loop: Callable[..., Any]):
        self.plexus = plexus
        self.store = plexus.state
        self.origin = uuid.uuid4().hex
        self.run_off_loop = run_off_loop
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def shared(self) -> bool:
        return self.plexus.config.state.kind != "memory"

    async def announce(
        self, tenant: str, kind: str, version: str = "", collection: str = ""
    ) -> None:
        """Tell the other replicas; a store that cannot answer is logged, never an error of
        the Admin call that made the change (the others catch up on their next resync)."""
        if not self.shared:
            return
        change = Change(self.origin, tenant, kind, version, collection)
        try:
            await self.store.publish(CHANNEL, json.dumps(asdict(change)))
        except StateUnavailable as exc:
            log.warning(
                "could not announce %s of tenant %s to other replicas: %s", kind, tenant, exc
            )

    async def start(self) -> None:
        """Follow the other replicas' notices from now on (returns once subscribed)."""
        if not self.shared or self._task is not None:
            return
        self._task = asyncio.create_task(self._follow(), name="plexus-changes")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout=5.0)
        except TimeoutError:
            log.warning("not yet subscribed to change notices; going on, retrying meanwhile")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _follow(self) -> None:
        """Apply notices as they come; the subscription yields ``""`` whenever it is (again)
        subscribed, and each time the shared pointers are checked for anything missed."""
        while True:
            subscription = self.store.subscribe(CHANNEL)
            try:
                async for message in subscription:
                    if message:
                        await self._apply(message)
                    else:
                        await self._resync()
                        self._ready.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never stop following
                log.warning("change notices interrupted (%s); subscribing again", exc)
            finally:
                await subscription.aclose()
            await asyncio.sleep(RESUBSCRIBE_SECONDS)

    async def _resync(self) -> None:
        """Serve the model versions the shared ACTIVE pointers name, where they differ."""
        for name, tenant in self.plexus.deciders.tenants.items():
            if tenant.config.model.version != "active":  # pinned by the configuration
                continue
            active = tenant.registry.active()
            if active and active != tenant.active.version:
                log.info("tenant %s: catching up with %s from the shared models", name, active)
                try:
                    await self.run_off_loop(tenant.load_version, active, True)
                except Exception:  # noqa: BLE001 - logged; the next notice or resync retries
                    log.exception("tenant %s: could not load %s", name, active)

    async def _apply(self, message: str) -> None:
        try:
            change = Change(**json.loads(message))
        except (TypeError, ValueError):
            log.warning("ignoring a malformed change notice")
            return
        if change.origin == self.origin or change.tenant not in self.plexus.deciders.tenants:
            return
        try:
            if change.kind == "model":
                tenant = self.plexus.deciders.tenants[change.tenant]
                if tenant.active.version != change.version:
                    await self.run_off_loop(tenant.load_version, change.version, True)
            elif change.kind == "rules":
                await self.run_off_loop(self.plexus.reload_rules, change.tenant)
            elif change.kind == "collection":
                collections = self.plexus.collections[change.tenant]
                await self.run_off_loop(collections.reload, change.collection)
            else:
                return
        except Exception:  # noqa: BLE001 - one bad change never stops the others
            log.exception(
                "could not apply %s of tenant %s from another replica", change.kind, change.tenant
            )
            return
        log.info("applied %s of tenant %s from another replica", change.kind, change.tenant)
