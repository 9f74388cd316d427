"""Firecracker-compatible API: JSON models, the pre-boot configuration, HTTP, routes.

Layering (each module has one job; data flows down):

- :mod:`~pyvmm.api.http` serves HTTP/1.1 on a Unix socket and hands each
  complete request to a callback; :mod:`~pyvmm.api.http_protocol` is its
  sans-IO request parser and response writer.
- :mod:`~pyvmm.api.routes` turns ``(method, path, body)`` into a call on a
  :class:`~pyvmm.api.controller.VmmController` or a change to
  :class:`~pyvmm.api.vm_config.VmResources`, enforcing Firecracker's
  pre-boot/post-boot rules.
- :mod:`~pyvmm.api.models` validates JSON bodies into typed dataclasses
  (:mod:`~pyvmm.api.fields` does the per-field checks and error wording).
- :mod:`~pyvmm.api.vm_config` aggregates the pre-boot configuration (also
  read from a ``--config-file``); :mod:`~pyvmm.api.machine_config` maps it
  onto :class:`pyvmm.config.MachineConfig`.

Nothing here touches KVM: the API layer only parses and checks.
"""
