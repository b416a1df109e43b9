"""The state of the simulated Qlik Cloud tenant: spaces, tags, apps and reloads.

Reloads advance lazily: every read or write first calls :meth:`World.advance`, which ends the
reloads whose run time is over and moves QUEUED reloads to RELOADING while the tenant has free
slots (``max_concurrent``), oldest first. No background thread, so a test that stops reading
sees a frozen tenant, and the clock (``World.clock``) can be skewed.

An app is either explicit (:class:`SimApp`, in ``apps``) or generated: ``generated_apps = N``
adds N apps that exist only as a function of their index (``gen-app-<i>``, all in the space
``generated`` and tagged ``generated``), so a tenant of 100,000 apps costs no memory.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ACTIVE = ("QUEUED", "RELOADING", "CANCELING")
END = ("SUCCEEDED", "FAILED", "CANCELED", "EXCEEDED_LIMIT")
GENERATED_SPACE = "generated"
GENERATED_TAG = "generated"
TENANT_ID = "SimTenant-0000000000000000000000"
USER_ID = "SimUser-00000000000000000000000"
_GEN_PREFIX = "9e000000-0000-4000-a000-"  # + 12 digits: the index of a generated app


def _hex_id(*parts: object) -> str:
    """A 24-hex id like Qlik's object ids, stable for the same parts."""
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:24]


def _guid(*parts: object) -> str:
    h = hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


@dataclass
class SimSpace:
    id: str
    name: str
    type: str = "shared"


@dataclass
class SimTag:
    id: str
    name: str


@dataclass
class SimApp:
    """An app; ``outcome`` is the end status of its reloads (SUCCEEDED, FAILED or
    EXCEEDED_LIMIT), ``run_seconds`` how long a reload stays RELOADING."""

    id: str
    name: str
    space_id: str | None = None
    tag_ids: list[str] = field(default_factory=list)
    run_seconds: float = 0.2
    outcome: str = "SUCCEEDED"
    error_message: str = "failed to complete reload: Field 'Amount' not found"
    script_log: str = ""

    @property
    def item_id(self) -> str:
        """The id of the app's entry in the items collection: NOT the app id."""
        return _hex_id("item", self.id)


@dataclass
class SimReload:
    id: str
    app_id: str
    partial: bool
    variables: dict[str, str]
    weight: int
    created: float
    type: str = "external"
    status: str = "QUEUED"
    started: float | None = None
    ended: float | None = None
    cancel_at: float | None = None


@dataclass(frozen=True)
class StartRecord:
    """A reload created through ``POST /api/v1/reloads``: (reload id, app id, time)."""

    reload_id: str
    app_id: str
    at: float


class World:
    """Thread-safe tenant state (one lock; the simulator's handlers share it)."""

    def __init__(
        self,
        spaces: list[SimSpace],
        tags: list[SimTag],
        apps: list[SimApp],
        *,
        max_concurrent: int = 4,
        generated_apps: int = 0,
    ) -> None:
        self.lock = threading.RLock()
        self.clock: Callable[[], float] = time.time
        self.spaces = {s.id: s for s in spaces}
        self.tags = {t.id: t for t in tags}
        self.apps = {a.id: a for a in apps}
        self.max_concurrent = max_concurrent
        self.generated_apps = generated_apps
        self.cancel_seconds = 0.05
        self.reloads: dict[str, SimReload] = {}
        self.starts: list[StartRecord] = []
        self._seq = itertools.count(1)
        self.spaces.setdefault(_hex_id("space", GENERATED_SPACE), SimSpace(_hex_id("space", GENERATED_SPACE), GENERATED_SPACE))
        self.tags.setdefault(_hex_id("tag", GENERATED_TAG), SimTag(_hex_id("tag", GENERATED_TAG), GENERATED_TAG))

    # --- apps -----------------------------------------------------------------------------------

    def generated(self, index: int) -> SimApp:
        return SimApp(
            id=f"{_GEN_PREFIX}{index:012d}",
            name=f"gen-app-{index}",
            space_id=_hex_id("space", GENERATED_SPACE),
            tag_ids=[_hex_id("tag", GENERATED_TAG)],
            run_seconds=0.05,
        )

    def app_count(self) -> int:
        return len(self.apps) + self.generated_apps

    def app_at(self, index: int) -> SimApp:
        """The app at a stable position: explicit apps first, then generated ones."""
        explicit = list(self.apps.values())
        return explicit[index] if index < len(explicit) else self.generated(index - len(explicit))

    def iter_apps(self, start: int) -> Iterator[tuple[int, SimApp]]:
        explicit = list(self.apps.values())
        for index in range(start, len(explicit) + self.generated_apps):
            yield index, (explicit[index] if index < len(explicit) else self.generated(index - len(explicit)))

    def app(self, app_id: str) -> SimApp | None:
        found = self.apps.get(app_id)
        if found is None and app_id.startswith(_GEN_PREFIX) and app_id[len(_GEN_PREFIX):].isdigit():
            index = int(app_id[len(_GEN_PREFIX):])
            return self.generated(index) if index < self.generated_apps else None
        return found

    # --- reloads --------------------------------------------------------------------------------

    def create_reload(self, app: SimApp, partial: bool, variables: dict[str, str], weight: int) -> SimReload:
        with self.lock:
            self.advance()
            now = self.clock()
            reload_id = _hex_id("reload", app.id, next(self._seq), now)
            reload = SimReload(reload_id, app.id, partial, dict(variables), weight, now)
            self.reloads[reload_id] = reload
            self.starts.append(StartRecord(reload_id, app.id, now))
            self.advance()
            return reload

    def start_elsewhere(self, app_id: str, type_: str = "hub") -> SimReload:
        """A reload of ``app_id`` started outside the API (the hub, a schedule): not in ``starts``."""
        with self.lock:
            now = self.clock()
            reload = SimReload(_hex_id("reload", app_id, next(self._seq), now), app_id, False, {}, 1, now, type=type_)
            self.reloads[reload.id] = reload
            self.advance()
            return reload

    def pending_for(self, app_id: str) -> SimReload | None:
        """A QUEUED reload of the app (Qlik answers 429 to a second request then)."""
        return next((r for r in self.reloads.values() if r.app_id == app_id and r.status == "QUEUED"), None)

    def advance(self) -> None:
        with self.lock:
            now = self.clock()
            for reload in self.reloads.values():
                if reload.status == "CANCELING" and reload.cancel_at is not None and now >= reload.cancel_at:
                    reload.status, reload.ended = "CANCELED", reload.cancel_at
                elif reload.status == "RELOADING" and reload.started is not None:
                    app = self.app(reload.app_id)
                    run = app.run_seconds if app is not None else 0.0
                    if now >= reload.started + run:
                        reload.status = app.outcome if app is not None else "FAILED"
                        reload.ended = reload.started + run
            running = sum(1 for r in self.reloads.values() if r.status in ("RELOADING", "CANCELING"))
            queued = sorted(
                (r for r in self.reloads.values() if r.status == "QUEUED"), key=lambda r: (-r.weight, r.created)
            )
            for reload in queued:
                if self.max_concurrent and running >= self.max_concurrent:
                    break
                reload.status, reload.started = "RELOADING", now
                running += 1

    def cancel(self, reload_id: str) -> str | None:
        """``"canceled"`` (was QUEUED), ``"canceling"``, ``"ended"`` or None (unknown)."""
        with self.lock:
            self.advance()
            reload = self.reloads.get(reload_id)
            if reload is None:
                return None
            now = self.clock()
            if reload.status == "QUEUED":
                reload.status, reload.ended = "CANCELED", now
                return "canceled"
            if reload.status == "RELOADING":
                reload.status, reload.cancel_at = "CANCELING", now + self.cancel_seconds
                return "canceling"
            return "canceling" if reload.status == "CANCELING" else "ended"

    def script_log_bytes(self, reload: SimReload) -> bytes:
        """The script log of an ended reload, built once (a huge log is then served without
        building it again)."""
        cache: dict[str, bytes] = self.__dict__.setdefault("_script_logs", {})
        if reload.id not in cache:
            cache[reload.id] = self.log_of(reload, script=True).encode()
        return cache[reload.id]

    def log_of(self, reload: SimReload, *, script: bool = False) -> str:
        """The reload's short ``log`` summary (as the Reload object carries it); with
        ``script``, the script log the logs endpoint serves (the app's ``script_log`` inside)."""
        app = self.app(reload.app_id)
        lines = [f"ReloadID: {reload.id}", "Started loading"]
        if script and app is not None and app.script_log:
            lines.extend(app.script_log.splitlines())
        elif not script:
            lines.append("(A detailed script progress log can be downloaded when the reload is finished)")
        if reload.status == "SUCCEEDED":
            lines += ["App saved", "Finished successfully"]
        elif reload.status in ("FAILED", "EXCEEDED_LIMIT"):
            lines += ["Error: " + (app.error_message if app else "app deleted"), "Execution Failed"]
        elif reload.status == "CANCELED":
            lines += ["Reload aborted"]
        return "\r\n".join(lines) + "\r\n"


def demo_world() -> World:
    """A small tenant: two spaces, three tags, same-name apps in different spaces."""
    finance = SimSpace(_hex_id("space", "Finance"), "Finance")
    sales = SimSpace(_hex_id("space", "Sales"), "Sales")
    nightly = SimTag(_hex_id("tag", "nightly"), "nightly")
    hourly = SimTag(_hex_id("tag", "hourly"), "hourly")
    broken = SimTag(_hex_id("tag", "broken"), "broken")
    apps = [
        SimApp(_guid("app", "Revenue", "Finance"), "Revenue", finance.id, [nightly.id]),
        SimApp(_guid("app", "Revenue", "Sales"), "Revenue", sales.id, [nightly.id, hourly.id]),
        SimApp(_guid("app", "Pipeline"), "Pipeline", sales.id, [hourly.id], run_seconds=1.0),
        SimApp(
            _guid("app", "Broken"), "Broken", finance.id, [broken.id], outcome="FAILED",
            script_log="LOAD Amount FROM [lib://erp/orders.qvd]",
        ),
    ]
    return World([finance, sales], [nightly, hourly, broken], apps)
