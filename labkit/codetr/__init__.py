"""Co-DETR: Deformable-DETR trained with auxiliary one-to-many heads and their positive queries."""
