"""The decoder model: its config, attention kernels and layers."""
