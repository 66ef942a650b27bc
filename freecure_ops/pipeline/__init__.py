"""The FreeCure method on top of the adapters: the two-pass pipeline (:class:`FreeCure`), APG, the attribute
vocabulary and masks, the face parsers (BiSeNet, SegFormer; ``parsers.load_face_parser`` picks one). Layers,
each importing only from below: ``kernels`` -> the op (``freecure_ops`` api, validation, backends, reference,
masks, hub) -> ``adapters`` -> this package -> the grid tools (``manifest``, ``grid``, ``batch``, ``evaluate``)
and the CLI."""
from .apg import apply_apg
from .foundation import Foundation, FoundationRecorder, record_foundation
from .freecure import EmptyMaskError, FreeCure, FreeCureOutput, FreeCureWarning, collate_branches

__all__ = ["FreeCure", "Foundation", "FoundationRecorder", "record_foundation", "FreeCureOutput", "FreeCureWarning",
           "EmptyMaskError", "collate_branches", "apply_apg"]
