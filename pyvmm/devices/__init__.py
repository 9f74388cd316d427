"""Device models: sans-IO register files, testable without KVM."""
