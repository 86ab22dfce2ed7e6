"""Why patches survive quantization, through four lenses; pure functions, numbers out.

- features: linear CKA per layer, patch dominance, Grad-CAM patch mass;
- quantization strength: per-layer relative output error of a quantized copy;
- gradient alignment: input-gradient cosine, Sobel Edge IoU, HOG cosine (with mean ± 95 % CI);
- spatial sensitivity: ASR of a fixed patch at every position of a grid.
"""

from quantpatch.analysis._common import default_layers, feature_map_layer, last_conv_layer
from quantpatch.analysis.features import (
    collect_activations,
    gradcam,
    gradcam_patch_mass,
    layerwise_cka,
    linear_cka,
    patch_dominance,
)
from quantpatch.analysis.gradients import (
    alignment_metrics,
    edge_iou,
    gradient_alignment,
    hog_cosine,
    hog_descriptor,
    input_gradients,
    mean_ci,
    sobel_edges,
    soft_edge_iou,
)
from quantpatch.analysis.quant_error import layer_quant_error
from quantpatch.analysis.sensitivity import (
    benchmark_spatial,
    grid_positions,
    patch_size_pixels,
    spatial_asr_map,
)

__all__ = [
    "alignment_metrics",
    "benchmark_spatial",
    "collect_activations",
    "default_layers",
    "edge_iou",
    "gradcam",
    "gradcam_patch_mass",
    "gradient_alignment",
    "grid_positions",
    "hog_cosine",
    "hog_descriptor",
    "input_gradients",
    "feature_map_layer",
    "last_conv_layer",
    "layer_quant_error",
    "layerwise_cka",
    "linear_cka",
    "mean_ci",
    "patch_dominance",
    "patch_size_pixels",
    "sobel_edges",
    "soft_edge_iou",
    "spatial_asr_map",
]
