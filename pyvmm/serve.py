"""The API-driven VMM process: ``pyvmm serve`` and the ``pyvmm-firecracker`` console script.

What a Firecracker process does, in this order: set up logging and metrics
from the command line, read ``--config-file`` (and boot from it), serve the
API on ``--api-sock`` unless ``--no-api``, then wait until the guest stops
or a signal arrives, and exit with the machine's exit status (0 for a
guest-requested reset or power-off, as Firecracker exits 0 when its guest
reboots). The guest's serial console is on the process's stdin/stdout.

Threads (Firecracker's split): the main thread is the VMM thread. It runs
every request that acts on the VM or its configuration, one at a time,
handed over by the API threads (:mod:`pyvmm.api.actions`); the API server
has an accept thread and one thread per client, which parse requests and
answer queries themselves; the machine has its vCPU threads and event loop.

Signals: SIGTERM or SIGINT stop the VM and end the process. Python runs the
handler on the main thread, so a long action running there (a boot, a
snapshot) is interrupted right away: the handler raises
:class:`~pyvmm.api.actions.ActionCancelledError`, the action unwinds through
its cleanup (no half-written snapshot file stays), its client gets a 503,
and the process exits.

Seccomp (unless ``--no-seccomp``): the filters are compiled before
anything starts, and the main thread confines itself with the ``vmm``
filter once the flags are read and before any other thread exists, so every
thread started after it inherits at least that filter; threads started
through :func:`~pyvmm.vmm.threads.spawn` with the setup add their own
role's filter (the API threads' is the narrow ``api`` one, since they never
build VMs). A denied call is logged, counted in ``seccomp.num_faults``, the
metrics are flushed, and the process exits with status 148
(:mod:`pyvmm.jail.faults`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.errors import ConfigError, PyvmmError

if TYPE_CHECKING:
    from pyvmm.api.actions import ActionQueue
    from pyvmm.api.early_socket import EarlySocket
    from pyvmm.api.routes import Router
    from pyvmm.api.vm_config import VmResources
    from pyvmm.api.vmm import MachineController
    from pyvmm.jail.thread_setup import SeccompSetup

log = logging.getLogger(__name__)

DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_INSTANCE_ID = "anonymous-instance"
#: How often the VMM thread looks at signals, the machine and due metrics when idle.
_TICK_S = 0.2


@dataclass(frozen=True)
class ServeOptions:
    api_sock: Path | None  # None: --no-api
    instance_id: str = DEFAULT_INSTANCE_ID
    config_file: Path | None = None
    metadata: Path | None = None  # --metadata: the MMDS data store's first contents
    log_path: Path | None = None
    level: str | None = None
    show_level: bool = False
    show_log_origin: bool = False
    log_module: str | None = None
    metrics_path: Path | None = None
    http_api_max_payload_size: int | None = None
    mmds_size_limit: int | None = None
    seccomp: bool = True
    seccomp_filter: Path | None = None  # None: pyvmm's default filters
    early_socket: EarlySocket | None = None  # the API socket, bound at start-up


class _Signals:
    """SIGTERM/SIGINT: stop the VM, end the loop, and cancel a running action."""

    def __init__(self, controller: MachineController, actions: ActionQueue) -> None:
        self.controller = controller
        self.actions = actions
        self.stop_requested = threading.Event()
        self.busy = False  # the main thread runs an action outside the queue (boot from file)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: object) -> None:
        from pyvmm.api.actions import ActionCancelledError
        from pyvmm.vmm.stop_reason import StopKind, StopReason

        self.stop_requested.set()
        name = signal.Signals(signum).name
        machine = self.controller.machine
        if machine is not None:
            machine.stop(StopReason(StopKind.HOST_SIGNAL, f"received {name}"))
        if self.busy or self.actions.running is not None:
            raise ActionCancelledError(f"received {name}")

    @contextlib.contextmanager
    def cancellable(self) -> Iterator[None]:
        self.busy = True
        try:
            yield
        finally:
            self.busy = False


def serve(options: ServeOptions) -> int:
    """Run one API-driven VMM until its guest stops; return the process exit status.

    Raises :class:`ConfigError` (one line, exit 2) for bad flags or a bad
    config file, before anything is left running.
    """
    from pyvmm.api.actions import ActionCancelledError, ActionQueue
    from pyvmm.api.http import ApiServer
    from pyvmm.api.models import Metrics
    from pyvmm.api.routes import Router
    from pyvmm.api.vmm import MachineController
    from pyvmm.vmm.threads import NO_SETUP

    if options.api_sock is None and options.config_file is None:
        raise ConfigError("--no-api needs --config-file: nothing could start the microVM")
    seccomp = _seccomp_setup(options)
    stdout_fd = sys.stdout.fileno()
    controller = MachineController(
        options.instance_id,
        serial_out=lambda data: os.write(stdout_fd, data),
        console_in=_stdin_fd(),
        thread_setup=seccomp or NO_SETUP,
    )
    # The early responder's thread ends before any filter goes in (every thread of a
    # running VMM has its role's filter); the API server serves its connections.
    early = options.early_socket
    handed, answered = early.stop_answering() if early is not None else ([], 0)
    if seccomp is not None:  # before the first thread (API) starts
        _confine_main_thread(seccomp, controller)
    resources = _resources(options)
    _configure_logger(options, controller)
    actions = ActionQueue()
    router = Router(controller, resources, max_body=_max_body(options), actions=actions)
    controller.api_counters = router.counters.as_metrics
    for _ in range(answered):
        router.counters.record("get_api_requests.instance_info", failed=False)
    if options.metrics_path is not None:
        controller.configure_metrics(Metrics(metrics_path=str(options.metrics_path)))
        router.metrics_initialized = True

    server = None
    reason = None
    if options.config_file is not None:
        router.ready.clear()  # queries wait for the boot from the file, as in Firecracker
    with _Signals(controller, actions) as signals:
        try:
            if options.api_sock is not None:
                server = ApiServer(
                    options.api_sock,
                    router,
                    body_limit=router.body_limit,
                    setup=seccomp or NO_SETUP,
                    on_error=lambda m: api_failed(controller, m, signals.stop_requested),
                    listener=early.listener if early is not None else None,
                )
                server.start()
                for pending in handed:
                    server.adopt(pending.sock, pending.data, pending.since)
            _run(options, router, controller, actions, signals)
        except ActionCancelledError:
            log.info("stopped by a signal while acting")
        finally:
            actions.close()
            if server is not None:
                server.close()
            controller.close()
        reason = controller.stop_reason
    if reason is None:
        log.info("stopped before the microVM started")
        return 0
    if reason.clean:
        log.info("%s", reason)
    else:
        print(f"pyvmm: {reason}", file=sys.stderr)
    return reason.exit_code


def _run(
    options: ServeOptions,
    router: Router,
    controller: MachineController,
    actions: ActionQueue,
    signals: _Signals,
) -> None:
    """The VMM thread's work: load the VM machinery, boot from a config file, serve actions.

    The API already answers queries; requests that act wait in the queue
    until the machinery is loaded.
    """
    with signals.cancellable():
        import pyvmm.vmm.machine  # noqa: F401 - the heavy part, after the socket answers
        from pyvmm.vmm.builder import import_on_demand_modules

        import_on_demand_modules()  # so that InstanceStart or a snapshot load imports nothing

        if options.config_file is not None:
            try:
                router.boot_from_config()
            finally:
                router.ready.set()
    while not signals.stop_requested.is_set() and not controller.finished:
        actions.run_pending(_TICK_S)
        controller.tick()


def _resources(options: ServeOptions) -> VmResources:
    """The configuration from ``--config-file`` and ``--metadata``; MMDS capped as Firecracker
    caps it (``--mmds-size-limit``, else the API's payload limit)."""
    from pyvmm.api.fields import read_json_file
    from pyvmm.api.operations import parse_mmds_contents
    from pyvmm.api.vm_config import VmResources

    limit = options.mmds_size_limit or _max_body(options)
    if options.config_file is not None:
        resources = VmResources.from_config_file(options.config_file, mmds_size_limit=limit)
    else:
        resources = VmResources(mmds_size_limit=limit)
    if options.metadata is not None:
        document = read_json_file(options.metadata, "metadata file", limit)
        try:
            resources.mmds.put(parse_mmds_contents(document, f"metadata file {options.metadata}"))
        except ConfigError as exc:
            raise ConfigError(f"metadata file {options.metadata}: {exc}") from None
    return resources


def _max_body(options: ServeOptions) -> int:
    from pyvmm.api.http_protocol import DEFAULT_MAX_BODY

    return options.http_api_max_payload_size or DEFAULT_MAX_BODY


def _configure_logger(options: ServeOptions, controller: MachineController) -> None:
    """Command-line logger, as Firecracker's --log-path/--level."""
    from pyvmm.api.models import Logger

    if options.log_path is not None or options.level is not None:
        controller.configure_logger(
            Logger(
                log_path=str(options.log_path) if options.log_path else None,
                level=options.level,
                show_level=options.show_level,
                show_log_origin=options.show_log_origin,
                module=options.log_module,
            )
        )


def _seccomp_setup(options: ServeOptions) -> SeccompSetup | None:
    """Compile the filters (a bad ``--seccomp-filter`` is a ConfigError); None if off."""
    if not options.seccomp:
        return None
    from pyvmm.jail.seccomp import FaultPolicy, make_setup

    return make_setup(options.seccomp_filter, FaultPolicy.EXIT)


def _confine_main_thread(setup: SeccompSetup, controller: MachineController) -> None:
    """From here on a denied call ends the process with 148, after a last metrics line."""
    from pyvmm.jail import faults
    from pyvmm.vmm.threads import ThreadRole

    def flush_metrics() -> None:
        writer = controller.metrics
        if writer is not None:
            writer.add_source(faults.metrics)
            writer.flush()

    faults.add_flush_hook(flush_metrics)
    setup.enter(ThreadRole.VMM)


def _stdin_fd() -> int | None:
    try:
        fd = sys.stdin.fileno()
        os.fstat(fd)
    except (AttributeError, ValueError, OSError):
        return None
    return fd


def run_serve(options: ServeOptions) -> None:
    """``serve`` with the CLI's error contract: one line and exit 2 for the user's mistakes."""
    try:
        code = serve(options)
    except ConfigError as error:
        print(f"pyvmm: error: {error}", file=sys.stderr)
        sys.exit(2)
    except PyvmmError as error:
        print(f"pyvmm: error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def api_failed(controller: MachineController, message: str, stop: threading.Event) -> None:
    """The API's accept loop died: nothing can drive the VM any more, so it stops, saying why."""
    from pyvmm.vmm.stop_reason import StopKind, StopReason

    print(f"pyvmm: {message}", file=sys.stderr)
    if controller.machine is not None:
        controller.machine.stop(StopReason(StopKind.VMM_ERROR, message))
    stop.set()
