"""Firecracker-compatible API: JSON models, the pre-boot configuration, HTTP, routes.

Layering (each module has one job; data flows down):

- :mod:`~pyvmm.api.early_socket` binds the API socket before anything heavy
  is imported, and :mod:`~pyvmm.api.early_responder` answers ``GET /`` on it
  until the API server takes over; :mod:`~pyvmm.api.launcher` builds
  ``launcher.c``, a C front door that binds it before Python even starts
  (clients that connect at once); :mod:`~pyvmm.api.version` is the version
  pyvmm reports.
- :mod:`~pyvmm.api.http` serves HTTP/1.1 on a Unix socket and hands each
  complete request to a callback; :mod:`~pyvmm.api.http_protocol` is its
  sans-IO request parser and response writer.
- :mod:`~pyvmm.api.routes` turns ``(method, path, body)`` into a call on a
  :class:`~pyvmm.api.controller.VmmController` or a change to
  :class:`~pyvmm.api.vm_config.VmResources`, enforcing Firecracker's
  pre-boot/post-boot rules; queries are answered on the API thread, the
  rest is handed to the VMM thread through :mod:`~pyvmm.api.actions`. The
  routes live by subject: :mod:`~pyvmm.api.routes` (queries, actions,
  snapshots), :mod:`~pyvmm.api.config_routes` (configuration),
  :mod:`~pyvmm.api.balloon_routes` (the balloon).
- :mod:`~pyvmm.api.models`, :mod:`~pyvmm.api.operations`,
  :mod:`~pyvmm.api.rate_limiters` and :mod:`~pyvmm.api.balloon` validate
  JSON bodies into typed dataclasses (:mod:`~pyvmm.api.fields` does the
  per-field checks and error wording).
- :mod:`~pyvmm.api.vm_config` aggregates the pre-boot configuration (also
  read from a ``--config-file``); :mod:`~pyvmm.api.machine_config` maps it
  onto :class:`pyvmm.config.MachineConfig`; :mod:`~pyvmm.api.mmds` is the
  metadata store.
- :mod:`~pyvmm.api.vmm` implements the controller on a
  :class:`~pyvmm.vmm.machine.Machine`.

Nothing here but :mod:`~pyvmm.api.vmm` touches the VM machinery: the API
layer parses, checks and forwards.
"""
