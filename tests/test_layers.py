"""Norms and MLPs against PyTorch's own modules and the written-out formulas."""

import torch
import torch.nn.functional as F

from monotile.core.layers import GeluMLP, LayerNorm, RMSNorm, SwiGLU


def test_layernorm_equals_torch_layernorm():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    ours, ref = LayerNorm(16, eps=1e-5), torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(x), ref(x))


def test_rmsnorm_is_x_over_root_mean_square_times_gain():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32)
    norm = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    ref = torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(norm.weight)
    torch.testing.assert_close(norm(x), ref(x))
    # bf16 in, bf16 out, computed in fp32 and rounded once (as Llama's RMSNorm)
    xb, nb = x.bfloat16(), norm.to(torch.bfloat16)
    x32, g32 = xb.float(), nb.weight.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * g32).bfloat16()
    assert nb(xb).dtype == torch.bfloat16
    torch.testing.assert_close(nb(xb), expected, atol=0, rtol=2 ** -8)


def test_gelu_mlp_is_fc2_of_gelu_of_fc1():
    torch.manual_seed(0)
    mlp, x = GeluMLP(8, 32, bias=True), torch.randn(2, 3, 8)
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    exact = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    torch.testing.assert_close(mlp(x), exact @ mlp.fc2.weight.T + mlp.fc2.bias)
    mlp.approximate = "tanh"
    tanh = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp(x), tanh @ mlp.fc2.weight.T + mlp.fc2.bias)


def test_swiglu_is_w2_of_silu_w1_times_w3():
    torch.manual_seed(0)
    mlp, x = SwiGLU(8, 24, bias=False), torch.randn(2, 3, 8)
    w1, w3 = mlp.gate_up.weight[:24], mlp.gate_up.weight[24:]
    expected = (F.silu(x @ w1.T) * (x @ w3.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)
