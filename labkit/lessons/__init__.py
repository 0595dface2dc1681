"""What the notebooks need beyond the package proper (import submodules directly).

* ``training``: ``train_and_evaluate`` (the one train-then-COCO-evaluate every lesson uses)
  and ``train_on_shapes`` (a briefly trained Deformable-DETR for notebook 04's pictures);
* ``attention_cost``: dense vs deformable attention, time, memory and the HBM floor;
* ``codetr_analysis``: Co-DETR's one-to-one positives, positives per decoder layer and the
  encoder memory's separability;
* ``trained``: the trained model an analysis runs on (the zoo's, or the ``checkpoint`` a user
  passes: labkit's or mmdetection's) and its images (``data``: COCO-format, read by
  ``labkit.data.spec`` like ``labkit eval``'s ``--data``); ``labkit eval`` shares its checkpoint
  loading.

This layer sits on top of the package (it may import engine, recipes and data); nothing
below imports it.
"""
