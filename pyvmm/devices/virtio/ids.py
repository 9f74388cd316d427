"""Virtio device type IDs (virtio 1.2, section 5), importable without any device model.

The device manager tells devices apart by these numbers, so a machine with
no balloon never imports the balloon's module.
"""

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19
