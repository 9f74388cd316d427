"""Virtio: split virtqueues, the virtio-mmio transport and device models."""
