"""The flow is invertible, its log|det J| is the true Jacobian's (checked against autograd), and it starts near the
identity so that the first epochs do not spend themselves undoing an exploded feature scale."""

import pytest
import torch
from scripts.flow import FLOW_INITS, SUBNETS, build_flow


@pytest.mark.parametrize("subnet", SUBNETS)
def test_flow_is_invertible(subnet):
    torch.manual_seed(0)
    flow = build_flow(channels=8, height=4, width=4, subnet=subnet, n_blocks=8, init="pytorch").eval()
    z = torch.randn(3, 8, 4, 4)
    z_prime, log_jac_det = flow(z)
    z_back, log_jac_det_rev = flow(z_prime, rev=True)
    assert z_prime.shape == z.shape and log_jac_det.shape == (3,)
    assert not torch.allclose(z_prime, z)
    torch.testing.assert_close(z_back, z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(log_jac_det_rev, -log_jac_det, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("subnet", SUBNETS)
def test_log_det_matches_autograd_jacobian(subnet):
    torch.manual_seed(1)
    flow = build_flow(channels=4, height=2, width=2, subnet=subnet, n_blocks=3).double().eval()
    for p in (p for p in flow.parameters() if p.requires_grad):  # leave the near-identity initialisation
        p.data += 0.3 * torch.randn_like(p)
    z = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    _, log_jac_det = flow(z)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 4, 2, 2))[0].flatten(), z.flatten())
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    torch.testing.assert_close(log_jac_det[0], log_abs_det, atol=1e-8, rtol=1e-6)


def test_unknown_subnet_is_rejected_with_allowed_values():
    with pytest.raises(ValueError, match="cnn2, resnet"):
        build_flow(4, 2, 2, subnet="transformer")


@pytest.mark.parametrize("subnet", SUBNETS)
def test_identity_init_keeps_the_feature_scale(subnet):
    torch.manual_seed(2)
    features = 5.0 * torch.randn(4, 16, 8, 8)  # the spread of EfficientNet-Lite0 features on real images
    flow = build_flow(channels=16, height=8, width=8, subnet=subnet, n_blocks=8, init="identity")
    z_prime, log_jac_det = flow(features)
    assert 0.8 < float(z_prime.std() / features.std()) < 2.0
    assert float(log_jac_det.abs().max()) / features[0].numel() < 0.5  # nats per dimension
    # both subnets' output layers start at zero, and still receive gradients (the flow can leave the identity)
    (z_prime.pow(2).sum() - log_jac_det.sum()).backward()
    for block in flow.module_list:
        output = block.subnet.shortcut if subnet == "resnet" else block.subnet[-1]
        assert not output.weight.any() and output.weight.grad.abs().sum() > 0


def test_pytorch_default_init_lets_the_resnet_subnet_blow_up_the_features():
    """Why ``identity`` is the default: the measured failure it prevents."""
    torch.manual_seed(2)
    features = 5.0 * torch.randn(4, 16, 8, 8)
    z_prime, _ = build_flow(channels=16, height=8, width=8, subnet="resnet", n_blocks=8, init="pytorch")(features)
    assert float(z_prime.std() / features.std()) > 10.0


def test_unknown_flow_init_is_rejected_with_allowed_values():
    with pytest.raises(ValueError, match=", ".join(FLOW_INITS)):
        build_flow(4, 2, 2, init="xavier")
