"""Tests on the host's /dev/kvm with the probe guest (user-mode code, native speed on PVM)."""
