"""The configuration routes: boot source, machine, devices, logger, metrics, MMDS, serial.

Registered into :mod:`pyvmm.api.routes`' table on import; they run on the
VMM thread with the configuration locked (see the router's docstring), and
PATCH on a running VM goes through the controller. Firecracker routes pyvmm
has no device for are answered here too, with a 400 that names what is
missing: ``/cpu-config`` (custom CPU templates), ``/pmem/{id}``
(virtio-pmem) and ``/hotplug/memory`` (virtio-mem).
"""

from __future__ import annotations

from typing import Any

from pyvmm.api import models, operations
from pyvmm.api.fields import Fields
from pyvmm.api.http_protocol import Response
from pyvmm.api.routes import Fault, Router, no_content, route

NOT_SUPPORTED = {
    "cpu_config": "custom CPU templates are not supported by pyvmm; use a static "
    "machine-config cpu_template (C3, T2, T2S, T2CL, T2A)",
    "pmem": "virtio-pmem devices are not supported by pyvmm",
    "hotplug_memory": "memory hot-plugging (virtio-mem) is not supported by pyvmm",
}


# --- boot source and machine configuration ----------------------------------------------


@route("PUT", "/boot-source", "boot_source")
def _put_boot_source(router: Router, value: Any, path_id: str | None) -> Response:
    boot = models.parse_boot_source(value)
    router.pre_boot(boot_specific=True)
    router.resources.set_boot_source(boot)
    return no_content()


@route("PUT", "/machine-config", "machine_cfg")
def _put_machine_config(router: Router, value: Any, path_id: str | None) -> Response:
    return _update_machine_config(router, models.parse_machine_config(value), "PUT")


@route("PATCH", "/machine-config", "machine_cfg")
def _patch_machine_config(router: Router, value: Any, path_id: str | None) -> Response:
    update = models.parse_machine_config_update(value)
    if update.empty:
        raise Fault("Empty PATCH request.")
    return _update_machine_config(router, update, "PATCH")


def _update_machine_config(
    router: Router, update: models.MachineConfigUpdate, verb: str
) -> Response:
    router.pre_boot(boot_specific=True)
    router.resources.update_machine_config(update)
    if update.cpu_template is not None and (verb == "PATCH" or update.cpu_template != "None"):
        return no_content(
            router.deprecated(f"{verb} /machine-config: cpu_template field is deprecated.")
        )
    return no_content()


# --- drives -------------------------------------------------------------------------------

_DRIVE_ID_MISMATCH = "The id from the path does not match the id from the body!"


@route("PUT", "/drives/{id}", "drive")
def _put_drive(router: Router, value: Any, path_id: str | None) -> Response:
    drive = models.parse_drive(value)
    router.check_id(path_id, drive.drive_id, _DRIVE_ID_MISMATCH)
    router.pre_boot(boot_specific=True)
    router.resources.set_drive(drive)
    return no_content()


@route("PATCH", "/drives/{id}", "drive", kind="action")
def _patch_drive(router: Router, value: Any, path_id: str | None) -> Response:
    patch = models.parse_partial_drive(value)
    router.check_id(path_id, patch.drive_id, _DRIVE_ID_MISMATCH)
    router.post_boot()
    if patch.path_on_host is None and patch.rate_limiter is None:
        raise Fault("drive: nothing to update (give path_on_host and/or rate_limiter)")
    updated = router.resources.patched_drive(patch)
    router.call(
        "Drive config error: Unable to patch the block device: ",
        router.controller.patch_drive,
        patch.drive_id,
        patch.path_on_host,
        patch.rate_limiter,
    )
    with router.changing() as resources:
        resources.replace_drive(updated)
    return no_content()


# --- network interfaces -------------------------------------------------------------------


def _net_id_message(path_id: str | None, body_id: str) -> str:
    return f"The id from the path [{path_id}] does not match the id from the body [{body_id}]!"


@route("PUT", "/network-interfaces/{id}", "network")
def _put_net(router: Router, value: Any, path_id: str | None) -> Response:
    net = models.parse_network_interface(value)
    router.check_id(path_id, net.iface_id, _net_id_message(path_id, net.iface_id))
    router.pre_boot(boot_specific=True)
    router.resources.set_network_interface(net)
    return no_content()


@route("PATCH", "/network-interfaces/{id}", "network")
def _patch_net(router: Router, value: Any, path_id: str | None) -> Response:
    patch = models.parse_partial_network_interface(value)
    router.check_id(path_id, patch.iface_id, _net_id_message(path_id, patch.iface_id))
    router.post_boot()
    updated = router.resources.patched_network_interface(patch)
    router.call(
        "Network config error: ",
        router.controller.patch_net,
        patch.iface_id,
        patch.rx_rate_limiter,
        patch.tx_rate_limiter,
    )
    router.resources.replace_network_interface(updated)
    return no_content()


# --- other devices ------------------------------------------------------------------------


@route("PUT", "/vsock", "vsock")
def _put_vsock(router: Router, value: Any, path_id: str | None) -> Response:
    vsock = models.parse_vsock(value)
    router.pre_boot(boot_specific=True)
    router.resources.set_vsock(vsock)
    if vsock.vsock_id is not None:
        return no_content(router.deprecated("PUT /vsock: vsock_id field is deprecated."))
    return no_content()


@route("PUT", "/entropy", "entropy")
def _put_entropy(router: Router, value: Any, path_id: str | None) -> Response:
    entropy = models.parse_entropy(value)
    router.pre_boot(boot_specific=True)
    router.resources.set_entropy(entropy)
    return no_content()


@route("PUT", "/serial", "serial")
def _put_serial(router: Router, value: Any, path_id: str | None) -> Response:
    fields = Fields(
        value,
        "serial",
        ("serial_out_path",),
        unsupported={"rate_limiter": "no rate limit on the serial console's output"},
    )
    path = fields.string("serial_out_path")
    router.pre_boot()
    router.resources.serial_out_path = path
    return no_content()


# --- logger and metrics -------------------------------------------------------------------


@route("PUT", "/logger", "logger")
def _put_logger(router: Router, value: Any, path_id: str | None) -> Response:
    logger = models.parse_logger(value)
    router.pre_boot()
    router.call("Logger error: ", router.controller.configure_logger, logger)
    router.resources.set_logger(logger)
    return no_content()


@route("PUT", "/metrics", "metrics")
def _put_metrics(router: Router, value: Any, path_id: str | None) -> Response:
    metrics = models.parse_metrics(value)
    router.pre_boot()
    if router.resources.metrics is not None or router.metrics_initialized:
        raise Fault("Metrics error: Reinitialization of metrics not allowed.")
    router.call("Metrics error: ", router.controller.configure_metrics, metrics)
    router.resources.set_metrics(metrics)
    return no_content()


# --- MMDS ---------------------------------------------------------------------------------


@route("PUT", "/mmds", "mmds")
def _put_mmds(router: Router, value: Any, path_id: str | None) -> Response:
    router.resources.mmds.put(operations.parse_mmds_contents(value))
    return no_content()


@route("PATCH", "/mmds", "mmds")
def _patch_mmds(router: Router, value: Any, path_id: str | None) -> Response:
    router.resources.mmds.patch(operations.parse_mmds_contents(value))
    return no_content()


@route("PUT", "/mmds/config", "mmds_config")
def _put_mmds_config(router: Router, value: Any, path_id: str | None) -> Response:
    config = operations.parse_mmds_config(value)
    router.pre_boot(boot_specific=True)
    router.resources.set_mmds_config(config)
    if config.version == "V1":
        return no_content(router.deprecated("PUT /mmds/config: V1 is deprecated. Use V2 instead."))
    return no_content()


# --- routes pyvmm has no device for ---------------------------------------------------------


def _refuse(feature: str) -> Any:
    def refuse(router: Router, value: Any, path_id: str | None) -> Response:
        raise Fault(NOT_SUPPORTED[feature])

    return refuse


route("PUT", "/cpu-config", "cpu_cfg")(_refuse("cpu_config"))
route("PUT", "/pmem/{id}", "pmem")(_refuse("pmem"))
route("PATCH", "/pmem/{id}", "pmem")(_refuse("pmem"))
route("PUT", "/hotplug/memory", "hotplug_memory")(_refuse("hotplug_memory"))
route("PATCH", "/hotplug/memory", "hotplug_memory")(_refuse("hotplug_memory"))
route("GET", "/hotplug/memory", "hotplug_memory")(_refuse("hotplug_memory"))
