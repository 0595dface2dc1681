"""Dense detection heads (RetinaNet, ATSS, PAA, FCOS, ...) and the one-stage detector; import submodules directly."""
