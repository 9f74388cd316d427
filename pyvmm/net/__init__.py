"""Host network back ends for virtio-net (a TAP device today)."""
