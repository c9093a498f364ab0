"""The data plane: Ray DAGs for backup, restore and verify. Imports `storage`, never `alike_ray`."""
