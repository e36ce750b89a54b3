"""The flow is invertible and its log|det J| is the true Jacobian's (checked against autograd)."""

import pytest
import torch

from scripts.flow import SUBNETS, build_flow


@pytest.mark.parametrize("subnet", SUBNETS)
def test_flow_is_invertible(subnet):
    torch.manual_seed(0)
    flow = build_flow(channels=8, height=4, width=4, subnet=subnet, n_blocks=8).eval()
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
