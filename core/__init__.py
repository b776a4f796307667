"""Settings, the model registry and the shared types; imports nothing else of vramq."""
