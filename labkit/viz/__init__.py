"""Plotting for notebooks: shared drawing basics here, topic helpers in ``labkit.viz.<topic>``."""

from labkit.viz.draw import (
    CLASS_COLORS,
    LEVEL_COLORS,
    class_color,
    draw_boxes,
    draw_level_grid,
    draw_points,
    grid,
    level_color,
    plot_loss_curves,
    show_detections,
    show_image,
    to_image_array,
)

__all__ = [
    "CLASS_COLORS",
    "LEVEL_COLORS",
    "class_color",
    "draw_boxes",
    "draw_level_grid",
    "draw_points",
    "grid",
    "level_color",
    "plot_loss_curves",
    "show_detections",
    "show_image",
    "to_image_array",
]
