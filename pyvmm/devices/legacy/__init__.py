"""Legacy platform devices as sans-IO register files: 16550A serial, i8042,
ACPI PM registers, pvpanic and the boot timer."""
