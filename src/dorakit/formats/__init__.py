"""On-disk layouts: PEFT adapter directories and their config mapping, merged checkpoints, diffusers' and
kohya/LyCORIS's diffusion-model files (through ``adapter_set``), and the one key mapping (``keys``).

Formats import the core (config, inject, layers) and never an integration."""
