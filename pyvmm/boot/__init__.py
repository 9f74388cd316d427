"""x86_64 boot: kernel loaders, boot parameters, tables and boot CPU state."""
