"""Run many emulated envs at once: serially, in processes on this machine, or on a Ray cluster."""
