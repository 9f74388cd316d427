"""Guest artifacts: the probe guest, and later kernels and initramfs images."""
