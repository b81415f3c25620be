"""On-disk layouts: PEFT adapter directories, their config mapping, merged checkpoints, and the one key mapping.

Formats import the core (config, inject, layers) and never an integration."""
