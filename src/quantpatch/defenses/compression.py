"""Compression defences: JPEG with a real codec, and bit-depth reduction (feature squeezing).

Both round, so neither has a useful gradient: attacks go through them with BPDA.
"""

from __future__ import annotations

import warnings

import torch

from quantpatch.defenses.base import DEFENSES, InputDefense, check_images, check_int
from quantpatch.errors import ShapeError


@DEFENSES.register
class JPEG(InputDefense):
    """JPEG compression with libjpeg (quality 1-100; torchvision.io, 8-bit codes).

    Always encoded on the CPU with libjpeg, so results do not depend on the device (GPU codecs
    produce other pixels). libjpeg has no batched API on the CPU: one encode and one decode
    call per image, inside this one batched function.
    """

    name = "jpeg"
    differentiable = False

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        self.quality = check_int("jpeg quality", quality, minimum=1, maximum=100)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        if images.shape[1] not in (1, 3):
            raise ShapeError(f"jpeg needs 1 or 3 channels, got {images.shape[1]}")
        if len(images) == 0:
            return images.detach().clone()
        # deferred: importing torchvision costs seconds (its models pull in torch._dynamo),
        # which every study, help and refused config would otherwise pay
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        codes = images.detach().mul(255).round_().clamp_(0, 255).to("cpu", torch.uint8)
        with warnings.catch_warnings():
            # torchvision >= 0.29 marks its codecs deprecated in favour of TorchCodec, which
            # needs a system FFmpeg; they still work, and the warning would fire per batch
            warnings.simplefilter("ignore", DeprecationWarning)
            encoded = encode_jpeg(list(codes.contiguous().unbind(0)), quality=self.quality)
            decoded = torch.stack(decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED))
        return decoded.to(images.device, images.dtype).div_(255)


@DEFENSES.register
class BitDepth(InputDefense):
    """Bit-depth reduction (bits per channel; Xu et al. 2018, feature squeezing)."""

    name = "bit-depth"
    differentiable = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = check_int("bit-depth bits", bits, minimum=1, maximum=8)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        return torch.round(images.clamp(0.0, 1.0) * levels) / levels
