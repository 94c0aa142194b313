"""Hydra launcher plugin of attn2d (Hydra loads launchers only from the `hydra_plugins` namespace)."""
