"""Tests of pure logic and host back ends; nothing here opens /dev/kvm."""
