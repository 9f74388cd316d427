"""The API-driven VMM process: ``pyvmm serve`` and the ``pyvmm-firecracker`` console script.

What a Firecracker process does, in this order: set up logging and metrics
from the command line, read ``--config-file`` (and boot from it), serve the
API on ``--api-sock`` unless ``--no-api``, then wait until the guest stops
or a signal arrives, and exit with the machine's exit status (0 for a
guest-requested reset or power-off, as Firecracker exits 0 when its guest
reboots). The guest's serial console is on the process's stdin/stdout.

Threads: the main thread waits here; the API server has an accept thread
and one thread per client; the machine has its vCPU threads and event loop.

Seccomp (unless ``--no-seccomp``): the filters are compiled before
anything starts, and the main thread confines itself with the ``vmm``
filter once the flags are read and before any other thread exists, so every
thread started after it inherits at least that filter; threads started
through :func:`~pyvmm.vmm.threads.spawn` with :attr:`ServeOptions` 's setup
add their own role's filter. A denied call is logged, counted in
``seccomp.num_faults``, the metrics are flushed, and the process exits
with status 148 (:mod:`pyvmm.jail.faults`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.errors import ConfigError, PyvmmError

if TYPE_CHECKING:
    from pyvmm.api.vmm import MachineController
    from pyvmm.jail.thread_setup import SeccompSetup

log = logging.getLogger(__name__)

DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_INSTANCE_ID = "anonymous-instance"


@dataclass(frozen=True)
class ServeOptions:
    api_sock: Path | None  # None: --no-api
    instance_id: str = DEFAULT_INSTANCE_ID
    config_file: Path | None = None
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


def serve(options: ServeOptions) -> int:
    """Run one API-driven VMM until its guest stops; return the process exit status.

    Raises :class:`ConfigError` (one line, exit 2) for bad flags or a bad
    config file, before anything is left running.
    """
    from pyvmm.api.http import ApiServer
    from pyvmm.api.models import Logger, Metrics
    from pyvmm.api.routes import Router
    from pyvmm.api.vm_config import VmResources
    from pyvmm.api.vmm import MachineController, preload_machine
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
    if seccomp is not None:  # before the first thread (metrics, API) starts
        _confine_main_thread(seccomp, controller)
    if options.config_file is not None:
        kwargs = {}
        if options.mmds_size_limit is not None:
            kwargs["mmds_size_limit"] = options.mmds_size_limit
        resources = VmResources.from_config_file(options.config_file, **kwargs)
    else:
        resources = VmResources()
    # Command-line logger/metrics, as Firecracker's --log-path/--metrics-path.
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
    router_kwargs = {}
    if options.http_api_max_payload_size is not None:
        router_kwargs["max_body"] = options.http_api_max_payload_size
    router = Router(controller, resources, **router_kwargs)
    controller.api_counters = router.counters.as_metrics
    if options.metrics_path is not None:
        controller.configure_metrics(Metrics(metrics_path=str(options.metrics_path)))

    server = None
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        from pyvmm.vmm.stop_reason import StopKind, StopReason

        stop_requested.set()
        machine = controller.machine
        if machine is not None:
            name = signal.Signals(signum).name
            machine.stop(StopReason(StopKind.HOST_SIGNAL, f"received {name}"))

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if options.api_sock is not None:
            server = ApiServer(
                options.api_sock,
                router,
                body_limit=router.body_limit,
                setup=seccomp or NO_SETUP,
                on_error=lambda message: api_failed(controller, message, stop_requested),
            )
            server.start()
            preload_machine()
        if options.config_file is not None:
            router.boot_from_config()
        while not stop_requested.is_set() and not controller.stopped.wait(0.2):
            pass
        reason = controller.stop_reason
    finally:
        if server is not None:
            server.close()
        controller.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if reason is None:
        log.info("stopped before the microVM started")
        return 0
    if reason.clean:
        log.info("%s", reason)
    else:
        print(f"pyvmm: {reason}", file=sys.stderr)
    return reason.exit_code


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
