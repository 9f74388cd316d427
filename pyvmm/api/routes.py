"""The router: Firecracker's API paths and rules on top of a :class:`VmmController`.

``Router.handle(method, path, body) -> Response`` is the HTTP server's
handler. It decodes the JSON body, parses it with :mod:`pyvmm.api.models`,
applies Firecracker's ordering rules, then changes the
:class:`~pyvmm.api.vm_config.VmResources` (pre-boot configuration) or calls
the controller (anything that acts on the VM). One lock serializes whole
requests, so the controller never sees two at once.

Rules (from Firecracker's ``rpc_interface.rs`` pre-boot/runtime
controllers and ``firecracker.yaml``):

- pre-boot only (afterwards 400 "The requested operation is not supported
  after starting the microVM."): ``InstanceStart``, PUT ``/boot-source``,
  ``/machine-config`` (and PATCH), ``/drives/{id}``,
  ``/network-interfaces/{id}``, ``/vsock``, ``/entropy``, ``/logger``,
  ``/metrics``, ``/mmds/config``, ``/snapshot/load``;
- post-boot only (before, 400 "... not supported before starting the
  microVM."): ``SendCtrlAltDel``, ``FlushMetrics``, PATCH ``/vm``,
  ``/drives/{id}``, ``/network-interfaces/{id}``, PUT ``/snapshot/create``;
- any time: GET ``/``, ``/version``, ``/vm/config``, ``/machine-config``,
  GET/PUT/PATCH ``/mmds``;
- ``/snapshot/load`` only on a fresh VMM: once a boot-specific resource
  (boot source, machine config, drive, net, vsock, entropy, MMDS config)
  was configured, even unsuccessfully, it is refused; logger, metrics and
  MMDS data do not count;
- ``/snapshot/create`` only while the VM is Paused (the yaml: "The microVM
  should be in the Paused state");
- ``InstanceStart`` needs a boot source; ``/metrics`` can be set once;
- the id in a ``/drives/{id}`` or ``/network-interfaces/{id}`` path must be
  letters, digits and underscores, and equal the body's id;
- a GET must not have a body, a PUT or PATCH must (an empty PATCH
  ``/machine-config`` is also "Empty PATCH request.").

Every error is ``{"fault_message": ...}`` with status 400, as in
Firecracker (which has no 404: an unknown path or method is a 400 "Invalid
request method and/or path"), except an MMDS store over its limit (413)
and a controller bug (500). Paths match exactly (Firecracker ignores extra
path segments; pyvmm refuses them).

:class:`ApiCounters` counts requests and failures per route for the
metrics writer.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvmm.api import models, operations
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


class _Fault(Exception):
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


# --- routes ---------------------------------------------------------------------------

# (self, body value, path id) -> Response
RouteHandler = Callable[["Router", Any, str | None], Response]


@dataclass(frozen=True)
class _Route:
    method: str
    path: tuple[str, ...]  # "{id}" marks the id segment
    metric: str
    handler: RouteHandler
    needs_body: bool


_ROUTES: list[_Route] = []


def _route(method: str, path: str, metric: str) -> Callable[[RouteHandler], RouteHandler]:
    def register(handler: RouteHandler) -> RouteHandler:
        segments = tuple(path.strip("/").split("/")) if path != "/" else ()
        group = f"{method.lower()}_api_requests"
        _ROUTES.append(_Route(method, segments, f"{group}.{metric}", handler, method != "GET"))
        return handler

    return register


def _no_content(headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(204, None, headers)


class Router:
    """Firecracker's API over ``controller`` and ``resources``; see the module docstring."""

    def __init__(
        self,
        controller: VmmController,
        resources: VmResources | None = None,
        *,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.controller = controller
        self.resources = resources if resources is not None else VmResources()
        self.max_body = max_body
        self.counters = ApiCounters()
        self._lock = threading.Lock()
        # A boot-specific resource was configured: no snapshot can be loaded any more.
        self._boot_path = _has_boot_resources(self.resources)

    # --- entry points -----------------------------------------------------------------
    def __call__(self, method: str, path: str, body: bytes) -> Response:
        return self.handle(method, path, body)

    def handle(self, method: str, path: str, body: bytes) -> Response:
        """Answer one request (thread-safe; requests run one at a time)."""
        with self._lock:
            try:
                route, path_id = self._resolve(method, path, body)
            except _Fault as fault:
                self.counters.record("invalid_api_requests.path", failed=True)
                return Response.fault(fault.status, str(fault))
            response = self._run(route, path_id, body)
            self.counters.record(route.metric, failed=response.status >= 400)
            return response

    def body_limit(self, method: str, path: str) -> int:
        """The HTTP body cap for a request: the MMDS store's limit on ``/mmds``."""
        if path.rstrip("/") == "/mmds" and method in ("PUT", "PATCH"):
            return max(self.max_body, self.resources.mmds.limit)
        return self.max_body

    def boot_from_config(self) -> None:
        """Firecracker's ``--config-file`` start: apply logger and metrics, then InstanceStart.

        Raises :class:`ConfigError` with the fault message on failure.
        """
        with self._lock:
            try:
                self._pre_boot()
                if self.resources.logger is not None:
                    self._call(
                        "Logger error: ", self.controller.configure_logger, self.resources.logger
                    )
                if self.resources.metrics is not None:
                    self._call(
                        "Metrics error: ", self.controller.configure_metrics, self.resources.metrics
                    )
                self._start()
            except _Fault as fault:
                raise ConfigError(str(fault)) from None

    # --- dispatch ---------------------------------------------------------------------
    def _resolve(self, method: str, path: str, body: bytes) -> tuple[_Route, str | None]:
        if method == "GET" and body:
            raise _Fault("GET request cannot have a body.")
        if method in ("PUT", "PATCH") and not body:
            raise _Fault(f"Empty {method} request.")
        segments = path.lstrip("/").split("/")
        if segments[-1] == "":
            segments.pop()  # "/" itself, or one trailing slash
        for route in _ROUTES:
            if route.method != method:
                continue
            if "{id}" in route.path:
                if segments[:1] != [route.path[0]]:
                    continue
                if len(segments) == 1:
                    raise _Fault(EMPTY_ID)
                if len(segments) != 2:
                    continue
                if not is_valid_id(segments[1]):
                    raise _Fault(INVALID_ID)
                return route, segments[1]
            if tuple(segments) == route.path:
                return route, None
        raise _Fault(f"Invalid request method and/or path: {method} {path}.")

    def _run(self, route: _Route, path_id: str | None, body: bytes) -> Response:
        try:
            value = None
            if route.needs_body:
                try:
                    value = loads_strict(body)
                except ValueError as exc:
                    raise _Fault(
                        f"An error occurred when deserializing the json body of a request: {exc}."
                    ) from None
            return route.handler(self, value, path_id)
        except _Fault as fault:
            return Response.fault(fault.status, str(fault))
        except MmdsLimitError as exc:
            return Response.fault(413, str(exc))
        except ConfigError as exc:
            return Response.fault(400, str(exc))
        except Exception as exc:
            log.exception("API route %s failed", route.metric)
            return Response.fault(500, f"Internal error: {type(exc).__name__}: {exc}")

    # --- helpers for the handlers -----------------------------------------------------
    @property
    def started(self) -> bool:
        return self.controller.state is not VmState.NOT_STARTED

    def _pre_boot(self, boot_specific: bool = False) -> None:
        if self.started:
            raise _Fault(NOT_SUPPORTED_POST_BOOT)
        if boot_specific:
            self._boot_path = True

    def _post_boot(self) -> None:
        if not self.started:
            raise _Fault(NOT_SUPPORTED_PRE_BOOT)

    @staticmethod
    def _call(prefix: str, action: Callable[..., None], *args: Any) -> None:
        """Run a controller action; its user-facing errors become 400 faults."""
        try:
            action(*args)
        except PyvmmError as exc:
            raise _Fault(f"{prefix}{exc}") from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise _Fault(f"{prefix}{exc.strerror or exc}{where}") from None

    @staticmethod
    def _check_id(path_id: str | None, body_id: str, message: str) -> None:
        if path_id != body_id:
            raise _Fault(message)

    @staticmethod
    def _deprecated(message: str) -> tuple[tuple[str, str], ...]:
        log.warning("%s", message)
        return DEPRECATION_HEADER

    def _start(self) -> None:
        if self.started:
            raise _Fault(NOT_SUPPORTED_POST_BOOT)
        if self.resources.boot_source is None:
            raise _Fault(MISSING_KERNEL)
        self._call("Start microvm error: ", self.controller.start, self.resources)

    # --- GET --------------------------------------------------------------------------
    @_route("GET", "/", "instance_info")
    def _get_instance_info(self, value: Any, path_id: str | None) -> Response:
        return Response(200, self.controller.instance_info().to_json())

    @_route("GET", "/version", "vmm_version")
    def _get_version(self, value: Any, path_id: str | None) -> Response:
        return Response(200, {"firecracker_version": self.controller.instance_info().vmm_version})

    @_route("GET", "/vm/config", "vm_config")
    def _get_vm_config(self, value: Any, path_id: str | None) -> Response:
        return Response(200, self.resources.to_json())

    @_route("GET", "/machine-config", "machine_cfg")
    def _get_machine_config(self, value: Any, path_id: str | None) -> Response:
        return Response(200, self.resources.machine_config.to_json())

    @_route("GET", "/mmds", "mmds")
    def _get_mmds(self, value: Any, path_id: str | None) -> Response:
        return Response(200, self.resources.mmds.get())

    # --- actions ----------------------------------------------------------------------
    @_route("PUT", "/actions", "actions")
    def _put_actions(self, value: Any, path_id: str | None) -> Response:
        action = operations.parse_instance_action(value)
        if action == "InstanceStart":
            self._start()
        elif action == "SendCtrlAltDel":
            self._post_boot()
            self._call("Internal VMM error: ", self.controller.send_ctrl_alt_del)
        else:
            self._post_boot()
            self._call("Internal VMM error: ", self.controller.flush_metrics)
        return _no_content()

    @_route("PATCH", "/vm", "vm")
    def _patch_vm(self, value: Any, path_id: str | None) -> Response:
        state = operations.parse_vm_state(value)
        self._post_boot()
        if state == "Paused":
            self._call("Internal VMM error: ", self.controller.pause)
        else:
            self._call("Internal VMM error: ", self.controller.resume)
        return _no_content()

    # --- boot source and machine configuration ----------------------------------------
    @_route("PUT", "/boot-source", "boot_source")
    def _put_boot_source(self, value: Any, path_id: str | None) -> Response:
        boot = models.parse_boot_source(value)
        self._pre_boot(boot_specific=True)
        self.resources.set_boot_source(boot)
        return _no_content()

    @_route("PUT", "/machine-config", "machine_cfg")
    def _put_machine_config(self, value: Any, path_id: str | None) -> Response:
        return self._update_machine_config(models.parse_machine_config(value), "PUT")

    @_route("PATCH", "/machine-config", "machine_cfg")
    def _patch_machine_config(self, value: Any, path_id: str | None) -> Response:
        update = models.parse_machine_config_update(value)
        if update.empty:
            raise _Fault("Empty PATCH request.")
        return self._update_machine_config(update, "PATCH")

    def _update_machine_config(self, update: models.MachineConfigUpdate, verb: str) -> Response:
        self._pre_boot(boot_specific=True)
        self.resources.update_machine_config(update)
        if update.cpu_template is not None:
            return _no_content(
                self._deprecated(f"{verb} /machine-config: cpu_template field is deprecated.")
            )
        return _no_content()

    # --- drives -----------------------------------------------------------------------
    @_route("PUT", "/drives/{id}", "drive")
    def _put_drive(self, value: Any, path_id: str | None) -> Response:
        drive = models.parse_drive(value)
        self._check_id(
            path_id, drive.drive_id, "The id from the path does not match the id from the body!"
        )
        self._pre_boot(boot_specific=True)
        self.resources.set_drive(drive)
        return _no_content()

    @_route("PATCH", "/drives/{id}", "drive")
    def _patch_drive(self, value: Any, path_id: str | None) -> Response:
        patch = models.parse_partial_drive(value)
        self._check_id(
            path_id, patch.drive_id, "The id from the path does not match the id from the body!"
        )
        self._post_boot()
        if patch.path_on_host is None and patch.rate_limiter is None:
            raise _Fault("drive: nothing to update (give path_on_host and/or rate_limiter)")
        updated = self.resources.patched_drive(patch)
        self._call(
            "Drive config error: Unable to patch the block device: ",
            self.controller.patch_drive,
            patch.drive_id,
            patch.path_on_host,
            patch.rate_limiter,
        )
        self.resources.replace_drive(updated)
        return _no_content()

    # --- network interfaces -----------------------------------------------------------
    @staticmethod
    def _net_id_message(path_id: str | None, body_id: str) -> str:
        return f"The id from the path [{path_id}] does not match the id from the body [{body_id}]!"

    @_route("PUT", "/network-interfaces/{id}", "network")
    def _put_net(self, value: Any, path_id: str | None) -> Response:
        net = models.parse_network_interface(value)
        self._check_id(path_id, net.iface_id, self._net_id_message(path_id, net.iface_id))
        self._pre_boot(boot_specific=True)
        self.resources.set_network_interface(net)
        return _no_content()

    @_route("PATCH", "/network-interfaces/{id}", "network")
    def _patch_net(self, value: Any, path_id: str | None) -> Response:
        patch = models.parse_partial_network_interface(value)
        self._check_id(path_id, patch.iface_id, self._net_id_message(path_id, patch.iface_id))
        self._post_boot()
        updated = self.resources.patched_network_interface(patch)
        self._call(
            "Network config error: ",
            self.controller.patch_net,
            patch.iface_id,
            patch.rx_rate_limiter,
            patch.tx_rate_limiter,
        )
        self.resources.replace_network_interface(updated)
        return _no_content()

    # --- other devices ----------------------------------------------------------------
    @_route("PUT", "/vsock", "vsock")
    def _put_vsock(self, value: Any, path_id: str | None) -> Response:
        vsock = models.parse_vsock(value)
        self._pre_boot(boot_specific=True)
        self.resources.set_vsock(vsock)
        if vsock.vsock_id is not None:
            return _no_content(self._deprecated("PUT /vsock: vsock_id field is deprecated."))
        return _no_content()

    @_route("PUT", "/entropy", "entropy")
    def _put_entropy(self, value: Any, path_id: str | None) -> Response:
        entropy = models.parse_entropy(value)
        self._pre_boot(boot_specific=True)
        self.resources.set_entropy(entropy)
        return _no_content()

    # --- logger and metrics -----------------------------------------------------------
    @_route("PUT", "/logger", "logger")
    def _put_logger(self, value: Any, path_id: str | None) -> Response:
        logger = models.parse_logger(value)
        self._pre_boot()
        self._call("Logger error: ", self.controller.configure_logger, logger)
        self.resources.set_logger(logger)
        return _no_content()

    @_route("PUT", "/metrics", "metrics")
    def _put_metrics(self, value: Any, path_id: str | None) -> Response:
        metrics = models.parse_metrics(value)
        self._pre_boot()
        if self.resources.metrics is not None:
            raise _Fault("Metrics error: Reinitialization of metrics not allowed.")
        self._call("Metrics error: ", self.controller.configure_metrics, metrics)
        self.resources.set_metrics(metrics)
        return _no_content()

    # --- MMDS -------------------------------------------------------------------------
    @_route("PUT", "/mmds", "mmds")
    def _put_mmds(self, value: Any, path_id: str | None) -> Response:
        self.resources.mmds.put(operations.parse_mmds_contents(value))
        return _no_content()

    @_route("PATCH", "/mmds", "mmds")
    def _patch_mmds(self, value: Any, path_id: str | None) -> Response:
        self.resources.mmds.patch(operations.parse_mmds_contents(value))
        return _no_content()

    @_route("PUT", "/mmds/config", "mmds_config")
    def _put_mmds_config(self, value: Any, path_id: str | None) -> Response:
        config = operations.parse_mmds_config(value)
        self._pre_boot(boot_specific=True)
        self.resources.set_mmds_config(config)
        if config.version == "V1":
            return _no_content(
                self._deprecated("PUT /mmds/config: V1 is deprecated. Use V2 instead.")
            )
        return _no_content()

    # --- snapshots --------------------------------------------------------------------
    @_route("PUT", "/snapshot/create", "snapshot_create")
    def _put_snapshot_create(self, value: Any, path_id: str | None) -> Response:
        params = operations.parse_snapshot_create(value)
        self._post_boot()
        if self.controller.state is not VmState.PAUSED:
            raise _Fault(
                "Create snapshot error: the microVM must be paused first "
                '(PATCH /vm {"state": "Paused"})'
            )
        self._call("Create snapshot error: ", self.controller.create_snapshot, params)
        return _no_content()

    @_route("PUT", "/snapshot/load", "snapshot_load")
    def _put_snapshot_load(self, value: Any, path_id: str | None) -> Response:
        params = operations.parse_snapshot_load(value)
        self._pre_boot()
        if self._boot_path:
            raise _Fault(LOAD_SNAPSHOT_NOT_ALLOWED)
        self._call("Load snapshot error: ", self.controller.load_snapshot, params, self.resources)
        if params.deprecated_fields:
            return _no_content(
                self._deprecated(
                    "PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are "
                    "deprecated."
                )
            )
        return _no_content()


def _has_boot_resources(resources: VmResources) -> bool:
    return (
        resources.boot_source is not None
        or resources.machine_config != models.MachineConfiguration()
        or bool(resources.drives)
        or bool(resources.nets)
        or resources.vsock is not None
        or resources.entropy is not None
        or resources.mmds_config is not None
    )
