"""MVTec AD as published (Bergmann et al., CVPR 2019): its 15 categories, their defect types and which are grey.

These are facts about the dataset on disk (``<root>/<category>/test/<defect>/`` folder names), used by
:func:`adcore.data.make_fake_mvtec` to write a look-alike and by anything that groups results the way the papers do
(five textures, ten objects). Nothing here reads the dataset; :func:`adcore.data.load_dataset` discovers what is there.
"""
from __future__ import annotations

TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor",
           "zipper")
CATEGORIES = tuple(sorted(TEXTURES + OBJECTS))
#: Categories whose PNGs are single-channel 8-bit grey; the other twelve are RGB.
GREY = ("grid", "screw", "zipper")
#: The ``test/`` folders of each category other than ``good`` (73 defect types in all), in folder (sorted) order.
DEFECT_TYPES = {
    "bottle": ("broken_large", "broken_small", "contamination"),
    "cable": ("bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation", "missing_cable",
              "missing_wire", "poke_insulation"),
    "capsule": ("crack", "faulty_imprint", "poke", "scratch", "squeeze"),
    "carpet": ("color", "cut", "hole", "metal_contamination", "thread"),
    "grid": ("bent", "broken", "glue", "metal_contamination", "thread"),
    "hazelnut": ("crack", "cut", "hole", "print"),
    "leather": ("color", "cut", "fold", "glue", "poke"),
    "metal_nut": ("bent", "color", "flip", "scratch"),
    "pill": ("color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"),
    "screw": ("manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"),
    "tile": ("crack", "glue_strip", "gray_stroke", "oil", "rough"),
    "toothbrush": ("defective",),
    "transistor": ("bent_lead", "cut_lead", "damaged_case", "misplaced"),
    "wood": ("color", "combined", "hole", "liquid", "scratch"),
    "zipper": ("broken_teeth", "combined", "fabric_border", "fabric_interior", "rough", "split_teeth",
               "squeezed_teeth"),
}

__all__ = ["CATEGORIES", "DEFECT_TYPES", "GREY", "OBJECTS", "TEXTURES"]
