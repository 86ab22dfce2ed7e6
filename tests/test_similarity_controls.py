"""The similarity lenses' references: debiased CKA and same-class pairs."""

from __future__ import annotations

import torch

from quantpatch.analysis import linear_cka
from quantpatch.study.run.analyses import _same_class_partner


def test_debiased_cka_sees_no_similarity_between_unrelated_wide_features() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 64, 3000, generator=generator)
    assert linear_cka(x, y) > 0.9  # plain CKA: biased towards 1 when N << width
    assert abs(linear_cka(x, y, debiased=True)) < 0.05
    assert linear_cka(x, 3 * x + 1, debiased=True) > 0.999  # scale and shift invariant


def test_same_class_partner_is_another_image_of_the_same_class() -> None:
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    partner, has = _same_class_partner(labels)
    assert has.tolist() == [True, True, True, False, True, True]  # class 2 has one image
    assert torch.equal(labels[partner], labels)
    assert (partner[has] != torch.arange(6)[has]).all()


def test_gradcam_on_resnets_uses_the_block_output_not_its_last_conv() -> None:
    from quantpatch.analysis import feature_map_layer
    from quantpatch.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10, image_size=32).eval()
    x = torch.rand(2, 1, 32, 32)
    layer = feature_map_layer(model, x)
    modules = dict(model.named_modules())
    outputs = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for n in (layer, "net.stages.2.2", "net.stages.2.2.conv2")]  # fmt: skip
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    assert torch.equal(outputs[layer], outputs["net.stages.2.2"])  # after the residual add
    assert not torch.equal(outputs[layer], outputs["net.stages.2.2.conv2"])
