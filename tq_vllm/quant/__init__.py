"""TurboQuant math: codebooks, rotations, bit packing, the page layout and the torch reference."""
from .codebook import boundaries, codebook
from .codec import LayerCodec
from .layout import LAYOUT_VERSION, PageLayout, page_layout
from .presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from .rotation import rotation
from .turboquant import TurboQuant

__all__ = ["TurboQuant", "PageLayout", "page_layout", "LAYOUT_VERSION", "Preset", "PRESETS", "DEFAULT_PRESET",
           "get_preset", "LayerCodec", "codebook", "boundaries", "rotation"]
