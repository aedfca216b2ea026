"""What runs around the algorithms: atomic files (io), processes under torchrun (distributed), fault injection for
the resume tests (faults), the device (device) and the run directory's lock and records (rundir)."""
