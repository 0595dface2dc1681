"""Deformable attention and Deformable-DETR (import submodules directly, e.g. ``labkit.detr.ms_deform_attn``)."""
