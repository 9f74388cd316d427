"""Real Linux guests end to end (in the nested KVM host where KVM is PVM)."""
