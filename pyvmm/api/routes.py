"""The router: Firecracker's API paths and rules on top of a :class:`VmmController`.

``Router.handle(method, path, body) -> Response`` is the HTTP server's
handler, called on API threads. It resolves the route and decodes the JSON
body there, then:

- a query (every ``GET``, and ``FlushMetrics``) is answered right there, so
  it never waits behind a long action;
- anything else is handed to :attr:`Router.actions` (the VMM thread, one
  request at a time, in :mod:`pyvmm.api.actions`): configuration changes
  and the actions that build, pause, snapshot or change the VM.

The routes themselves live by subject: actions, VM state, snapshots and the
queries here; the pre-boot configuration in :mod:`pyvmm.api.config_routes`;
the balloon in :mod:`pyvmm.api.balloon_routes`. A route handler parses with
:mod:`pyvmm.api.models` / :mod:`pyvmm.api.operations`, applies
Firecracker's ordering rules, then changes the
:class:`~pyvmm.api.vm_config.VmResources` or calls the controller.

Rules (from Firecracker's ``rpc_interface.rs`` pre-boot/runtime
controllers and ``firecracker.yaml``):

- pre-boot only (afterwards 400 "The requested operation is not supported
  after starting the microVM."): ``InstanceStart``, PUT ``/boot-source``,
  ``/machine-config`` (and PATCH), ``/drives/{id}``,
  ``/network-interfaces/{id}``, ``/vsock``, ``/entropy``, ``/balloon``,
  ``/serial``, ``/logger``, ``/metrics``, ``/mmds/config``,
  ``/snapshot/load``;
- post-boot only (before, 400 "... not supported before starting the
  microVM."): ``SendCtrlAltDel``, PATCH ``/vm``, ``/drives/{id}``,
  ``/network-interfaces/{id}``, PUT ``/snapshot/create``, GET
  ``/balloon/statistics``;
- any time: GET ``/``, ``/version``, ``/vm/config``, ``/machine-config``,
  ``/balloon``, GET/PUT/PATCH ``/mmds``, PATCH ``/balloon`` and
  ``/balloon/statistics``, ``FlushMetrics`` (a no-op without metrics);
- ``/snapshot/load`` only on a fresh VMM: once a boot-specific resource
  (boot source, machine config, drive, net, vsock, entropy, balloon, MMDS
  config) was configured, even unsuccessfully, it is refused; logger,
  metrics and MMDS data do not count;
- ``/snapshot/create`` only while the VM is Paused; pausing a paused VM and
  resuming a running one succeed and change nothing;
- ``InstanceStart`` needs a boot source; metrics can be set once (also
  counting ``--metrics-path``).

Paths are matched as Firecracker matches them: by their first segment (and
the second where a resource has sub-resources: ``/vm/config``,
``/snapshot/create``, ``/mmds/config``, ``/balloon/statistics``); further
segments are ignored, except under a resource with sub-resources, where an
unknown one is an error. Every error is ``{"fault_message": ...}`` with
status 400 (Firecracker has no 404: an unknown path or method is "Invalid
request method and/or path"), except an MMDS store over its limit (413),
a request cancelled because the VMM is stopping (503) and a bug (500).

:class:`ApiCounters` counts requests and failures per route for the
metrics writer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyvmm.api import operations
from pyvmm.api.actions import ActionCancelledError, Actions, InlineActions
from pyvmm.api.controller import VmmController
from pyvmm.api.fields import is_valid_id, loads_strict
from pyvmm.api.http_protocol import DEFAULT_MAX_BODY, Response
from pyvmm.api.mmds import MmdsLimitError
from pyvmm.api.vm_config import VmResources
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.vmm.lifecycle import VmState

log = logging.getLogger(__name__)

NOT_SUPPORTED_POST_BOOT = "The requested operation is not supported after starting the microVM."
NOT_SUPPORTED_PRE_BOOT = "The requested operation is not supported before starting the microVM."
LOAD_SNAPSHOT_NOT_ALLOWED = (
    "Load snapshot error: Loading a microVM snapshot not allowed after configuring "
    "boot-specific resources."
)
MISSING_KERNEL = "Start microvm error: Cannot start microvm without kernel configuration."
EMPTY_ID = "The ID cannot be empty."
INVALID_ID = "API Resource IDs can only contain alphanumeric characters and underscores."
DEPRECATION_HEADER = (("Deprecation", "true"),)


class Fault(Exception):
    """A request refused with ``status`` and Firecracker's ``fault_message``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- request counters -----------------------------------------------------------------


@dataclass
class ApiCounters:
    """Requests and failures (4xx/5xx answers) per route, e.g. ``"put_api_requests.drive"``.

    Keys follow Firecracker's metric groups (``get_api_requests``,
    ``put_api_requests``, ``patch_api_requests``) and names (``drive``,
    ``network``, ``machine_cfg``...); requests no route matched count as
    ``invalid_api_requests.path``. Safe to read from any thread.
    """

    requests: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, key: str, failed: bool) -> None:
        with self._lock:
            self.requests[key] += 1
            if failed:
                self.failures[key] += 1

    def as_metrics(self) -> dict[str, dict[str, int]]:
        """``{"put_api_requests": {"drive_count": 3, "drive_fails": 1}, ...}``."""
        with self._lock:
            groups: dict[str, dict[str, int]] = {}
            for key, count in self.requests.items():
                group, name = key.split(".", 1)
                groups.setdefault(group, {})[f"{name}_count"] = count
                groups[group][f"{name}_fails"] = self.failures[key]
            return groups


# --- the route table --------------------------------------------------------------------

# (router, body value, path id) -> Response
RouteHandler = Callable[["Router", Any, "str | None"], Response]


@dataclass(frozen=True)
class Route:
    """One route: ``path`` segments ("{id}" marks an id), where its handler runs."""

    method: str
    path: tuple[str, ...]
    metric: str
    handler: RouteHandler
    #: "query": on the API thread; "config": on the VMM thread with the configuration
    #: locked; "action": on the VMM thread, locking the configuration only to change it.
    kind: str

    @property
    def needs_body(self) -> bool:
        return self.method != "GET"


ROUTES: list[Route] = []


def route(
    method: str, path: str, metric: str, kind: str = "config"
) -> Callable[[RouteHandler], RouteHandler]:
    """Register ``handler`` for ``method path`` (GET routes are always queries)."""

    def register(handler: RouteHandler) -> RouteHandler:
        segments = tuple(path.strip("/").split("/")) if path != "/" else ()
        group = f"{method.lower()}_api_requests"
        where = "query" if method == "GET" else kind
        ROUTES.append(Route(method, segments, f"{group}.{metric}", handler, where))
        return handler

    return register


def no_content(headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(204, None, headers)


class Router:
    """Firecracker's API over ``controller`` and ``resources``; see the module docstring."""

    def __init__(
        self,
        controller: VmmController,
        resources: VmResources | None = None,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        actions: Actions | None = None,
    ) -> None:
        self.controller = controller
        self.resources = resources if resources is not None else VmResources()
        self.max_body = max_body
        #: Where requests that act run: the VMM thread's queue when served by
        #: ``pyvmm serve``, the calling thread otherwise.
        self.actions: Actions = actions or InlineActions()
        self.counters = ApiCounters()
        #: ``--metrics-path`` configured metrics already: ``PUT /metrics`` is then refused.
        self.metrics_initialized = False
        # Queries read the configuration while the VMM thread changes it.
        self._state_lock = threading.RLock()
        # A boot-specific resource was configured: no snapshot can be loaded any more.
        self.boot_path = _has_boot_resources(self.resources)
        #: Cleared while a ``--config-file`` boot runs: Firecracker answers nothing before
        #: that boot is done, so no client sees a "Not started" VM it asked to boot.
        self.ready = threading.Event()
        self.ready.set()

    # --- entry points -----------------------------------------------------------------
    def __call__(self, method: str, path: str, body: bytes) -> Response:
        return self.handle(method, path, body)

    def handle(self, method: str, path: str, body: bytes) -> Response:
        """Answer one request (any thread); see the module docstring for where it runs."""
        try:
            found, path_id = self._resolve(method, path, body)
        except Fault as fault:
            self.counters.record("invalid_api_requests.path", failed=True)
            return Response.fault(fault.status, str(fault))
        response = self._dispatch(found, path_id, body)
        self.counters.record(found.metric, failed=response.status >= 400)
        return response

    def body_limit(self, method: str, path: str) -> int:
        """The HTTP body cap for a request: the MMDS store's limit on ``/mmds``."""
        if path.rstrip("/") == "/mmds" and method in ("PUT", "PATCH"):
            return max(self.max_body, self.resources.mmds.limit)
        return self.max_body

    def boot_from_config(self) -> None:
        """Firecracker's ``--config-file`` start: apply logger and metrics, then InstanceStart.

        Runs on the VMM thread. Raises :class:`ConfigError` with the fault message.
        """
        try:
            self.pre_boot()
            if self.resources.logger is not None:
                self.call("Logger error: ", self.controller.configure_logger, self.resources.logger)
            if self.resources.metrics is not None:
                self.call(
                    "Metrics error: ", self.controller.configure_metrics, self.resources.metrics
                )
            self.start()
        except Fault as fault:
            raise ConfigError(str(fault)) from None

    # --- dispatch ---------------------------------------------------------------------
    def _resolve(self, method: str, path: str, body: bytes) -> tuple[Route, str | None]:
        if method == "GET" and body:
            raise Fault("GET request cannot have a body.")
        if method in ("PUT", "PATCH") and not body and not _may_be_empty(method, path):
            raise Fault(f"Empty {method} request.")
        tokens = [token for token in path.split("/") if token]
        candidates = [r for r in ROUTES if r.method == method and r.path[:1] == tuple(tokens[:1])]
        deepest = max((len(r.path) for r in candidates), default=0)
        for candidate in sorted(candidates, key=lambda r: -len(r.path)):
            fixed = [s for s in candidate.path if s != "{id}"]
            if "{id}" in candidate.path:
                if len(tokens) < 2:
                    raise Fault(EMPTY_ID)
                if not is_valid_id(tokens[1]):
                    raise Fault(INVALID_ID)
                return candidate, tokens[1]
            if tokens[: len(fixed)] != fixed:
                continue
            # Extra segments are ignored, unless the resource has sub-resources.
            if len(tokens) > len(fixed) and deepest > len(fixed):
                break
            return candidate, None
        raise Fault(f"Invalid request method and/or path: {method} {path}.")

    def _dispatch(self, found: Route, path_id: str | None, body: bytes) -> Response:
        try:
            value = self._decode(found, body)
            if found.kind == "query" or _runs_inline(found, value):
                self.ready.wait()
                with self._state_lock:
                    return self._run(found, value, path_id)
            return self.actions.call(lambda: self._run_on_vmm_thread(found, value, path_id))
        except Fault as fault:
            return Response.fault(fault.status, str(fault))
        except ActionCancelledError:
            return Response.fault(503, "The request was cancelled: the VMM is stopping.")

    def _run_on_vmm_thread(self, found: Route, value: Any, path_id: str | None) -> Response:
        if found.kind == "action":
            return self._run(found, value, path_id)
        with self._state_lock:
            return self._run(found, value, path_id)

    @staticmethod
    def _decode(found: Route, body: bytes) -> Any:
        if not found.needs_body or not body:
            return None
        try:
            return loads_strict(body)
        except ValueError as exc:
            raise Fault(
                f"An error occurred when deserializing the json body of a request: {exc}."
            ) from None

    def _run(self, found: Route, value: Any, path_id: str | None) -> Response:
        try:
            return found.handler(self, value, path_id)
        except Fault as fault:
            return Response.fault(fault.status, str(fault))
        except MmdsLimitError as exc:
            return Response.fault(413, str(exc))
        except ConfigError as exc:
            return Response.fault(400, str(exc))
        except Exception as exc:
            log.exception("API route %s failed", found.metric)
            return Response.fault(500, f"Internal error: {type(exc).__name__}: {exc}")

    # --- helpers for the handlers -----------------------------------------------------
    @property
    def started(self) -> bool:
        return self.controller.state is not VmState.NOT_STARTED

    @contextlib.contextmanager
    def changing(self) -> Iterator[VmResources]:
        """The configuration, locked against queries, for an action to change it."""
        with self._state_lock:
            yield self.resources

    def pre_boot(self, boot_specific: bool = False) -> None:
        if self.started:
            raise Fault(NOT_SUPPORTED_POST_BOOT)
        if boot_specific:
            self.boot_path = True

    def post_boot(self) -> None:
        if not self.started:
            raise Fault(NOT_SUPPORTED_PRE_BOOT)

    @staticmethod
    def call(prefix: str, action: Callable[..., Any], *args: Any) -> Any:
        """Run a controller action; its user-facing errors become 400 faults."""
        try:
            return action(*args)
        except PyvmmError as exc:
            raise Fault(f"{prefix}{exc}") from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise Fault(f"{prefix}{exc.strerror or exc}{where}") from None

    @staticmethod
    def check_id(path_id: str | None, body_id: str, message: str) -> None:
        if path_id != body_id:
            raise Fault(message)

    @staticmethod
    def deprecated(message: str) -> tuple[tuple[str, str], ...]:
        log.warning("%s", message)
        return DEPRECATION_HEADER

    def start(self) -> None:
        if self.started:
            raise Fault(NOT_SUPPORTED_POST_BOOT)
        if self.resources.boot_source is None:
            raise Fault(MISSING_KERNEL)
        self.call("Start microvm error: ", self.controller.start, self.resources)


def _may_be_empty(method: str, path: str) -> bool:
    """Firecracker's bodiless PATCH: ``/balloon/hinting/stop`` (start's body is optional)."""
    return method == "PATCH" and path.rstrip("/").startswith("/balloon/hinting/")


def _runs_inline(found: Route, value: Any) -> bool:
    """``FlushMetrics`` is a query in all but name: it must not wait behind an action."""
    return (
        found.metric == "put_api_requests.actions"
        and isinstance(value, dict)
        and value.get("action_type") == "FlushMetrics"
    )


def _has_boot_resources(resources: VmResources) -> bool:
    from pyvmm.api.models import MachineConfiguration

    return (
        resources.boot_source is not None
        or resources.machine_config != MachineConfiguration()
        or bool(resources.drives)
        or bool(resources.nets)
        or resources.vsock is not None
        or resources.entropy is not None
        or resources.mmds_config is not None
        or resources.balloon is not None
    )


# --- queries ----------------------------------------------------------------------------


@route("GET", "/", "instance_info")
def _get_instance_info(router: Router, value: Any, path_id: str | None) -> Response:
    return Response(200, router.controller.instance_info().to_json())


@route("GET", "/version", "vmm_version")
def _get_version(router: Router, value: Any, path_id: str | None) -> Response:
    return Response(200, {"firecracker_version": router.controller.instance_info().vmm_version})


@route("GET", "/vm/config", "vm_config")
def _get_vm_config(router: Router, value: Any, path_id: str | None) -> Response:
    return Response(200, router.resources.to_json())


@route("GET", "/machine-config", "machine_cfg")
def _get_machine_config(router: Router, value: Any, path_id: str | None) -> Response:
    return Response(200, router.resources.machine_config.to_json())


@route("GET", "/mmds", "mmds")
def _get_mmds(router: Router, value: Any, path_id: str | None) -> Response:
    return Response(200, router.resources.mmds.get())


# --- actions and the VM's state -----------------------------------------------------------


@route("PUT", "/actions", "actions", kind="action")
def _put_actions(router: Router, value: Any, path_id: str | None) -> Response:
    action = operations.parse_instance_action(value)
    if action == "InstanceStart":
        router.start()
    elif action == "SendCtrlAltDel":
        router.post_boot()
        router.call("Internal VMM error: ", router.controller.send_ctrl_alt_del)
    else:  # FlushMetrics: any time; without metrics configured there is nothing to do
        router.call("Internal VMM error: ", router.controller.flush_metrics)
    return no_content()


@route("PATCH", "/vm", "vm", kind="action")
def _patch_vm(router: Router, value: Any, path_id: str | None) -> Response:
    state = operations.parse_vm_state(value)
    router.post_boot()
    if state == "Paused":
        router.call("Internal VMM error: ", router.controller.pause)
    else:
        router.call("Internal VMM error: ", router.controller.resume)
    return no_content()


# --- snapshots ------------------------------------------------------------------------------


@route("PUT", "/snapshot/create", "snapshot_create", kind="action")
def _put_snapshot_create(router: Router, value: Any, path_id: str | None) -> Response:
    params = operations.parse_snapshot_create(value)
    router.post_boot()
    if router.controller.state is not VmState.PAUSED:
        raise Fault(
            "Create snapshot error: the microVM must be paused first "
            '(PATCH /vm {"state": "Paused"})'
        )
    router.call("Create snapshot error: ", router.controller.create_snapshot, params)
    return no_content()


@route("PUT", "/snapshot/load", "snapshot_load", kind="action")
def _put_snapshot_load(router: Router, value: Any, path_id: str | None) -> Response:
    params = operations.parse_snapshot_load(value)
    router.pre_boot()
    if router.boot_path:
        raise Fault(LOAD_SNAPSHOT_NOT_ALLOWED)
    # The controller describes the restored VM in a copy; queries see it once it is whole.
    staged = copy.copy(router.resources)
    router.call("Load snapshot error: ", router.controller.load_snapshot, params, staged)
    with router.changing() as resources:
        vars(resources).update(vars(staged))
    if params.deprecated_fields:
        return no_content(
            router.deprecated(
                "PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are deprecated."
            )
        )
    return no_content()


# The other routes register themselves on import (after Router exists).
from pyvmm.api import balloon_routes, config_routes  # noqa: E402, F401
