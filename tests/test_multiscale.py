"""Resolution transfers of conv kernels (Haber et al.): Galerkin products, prolongation, networks."""
import math

import pytest
import torch
import torch.nn.functional as tf

from parml.model import ModelSpec, StageSpec, build_model
from parml.multilevel.multiscale import (galerkin_kernel, galerkin_matrix, gaussian_blur, prolongate_image,
                              prolongate_kernel, prolongate_model, prolongation_matrix, resolution_spec,
                              restrict_image, restrict_kernel, restrict_model)

torch.set_num_threads(1)

S_H = torch.tensor([[-0.89, -2.03, 4.30], [-2.07, 0.00, -2.07], [4.39, -2.03, 1.28]], dtype=torch.float64)


def test_haber_example_1_stencil():
    """The paper's Example 1: the fine stencil and its restriction (printed to two decimals)."""
    expected = torch.tensor([[-0.48, -0.17, 0.82], [-0.15, -0.80, 0.37], [0.84, 0.40, 0.07]], dtype=torch.float64)
    torch.testing.assert_close(restrict_kernel(S_H), expected, atol=0.01, rtol=0)   # both printed rounded


def test_galerkin_kernel_is_r_k_p_away_from_the_boundary():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 12, 12, generator=g, dtype=torch.float64)
    coarse = tf.conv2d(y, restrict_kernel(w), padding=1)
    galerkin = restrict_image(tf.conv2d(prolongate_image(y), w, padding=1))
    torch.testing.assert_close(coarse[..., 1:-1, 1:-1], galerkin[..., 1:-1, 1:-1], rtol=1e-12, atol=1e-12)
    assert restrict_image(y).shape == (2, 3, 6, 6) and prolongate_image(y).shape == (2, 3, 24, 24)
    # R = P^T / 4: <R u, v> = <u, P v> / 4
    u, v = torch.randn(1, 1, 12, 12, dtype=torch.float64), torch.randn(1, 1, 6, 6, dtype=torch.float64)
    assert abs(float((restrict_image(u) * v).sum() - (u * prolongate_image(v)).sum() / 4)) < 1e-12


def test_galerkin_operator_on_smooth_images_is_second_order():
    """K_H (R y) vs R (K_h y) for a smooth image: the gap falls by 4 per halving of h."""
    gaps = []
    for n in (32, 64, 128, 256):
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        y = (torch.sin(2 * math.pi * x)[:, None] * torch.cos(3 * x)[None, :] + x[None, :] ** 2)[None, None]
        coarse = tf.conv2d(restrict_image(y), restrict_kernel(S_H)[None, None], padding=1)
        fine_restricted = restrict_image(tf.conv2d(y, S_H[None, None], padding=1))
        m = n // 8                                           # away from the zero-padded boundary
        gaps.append(float((coarse - fine_restricted)[..., m:-m, m:-m].abs().max()))
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert all(3.5 < r < 4.5 for r in ratios), (gaps, ratios)


def test_prolongate_then_restrict_is_the_identity():
    assert torch.linalg.matrix_rank(galerkin_matrix()) == 9
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(restrict_kernel(prolongate_kernel(coarse)), coarse, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prolongate_kernel(restrict_kernel(coarse)), coarse, rtol=1e-10, atol=1e-12)
    # G preserves stencil sums (constants): R and P both keep a constant image constant
    torch.testing.assert_close(restrict_kernel(coarse).sum((-1, -2)), coarse.sum((-1, -2)))
    with pytest.raises(ValueError, match="3x3"):
        galerkin_kernel(torch.zeros(2, 2, 1, 1))


def test_galerkin_eigenvalues_are_the_derivative_scalings():
    """G scales a stencil's parts by 2^-(a+b), a, b = 0..2 (derivative order in each direction), so
    G^-1 amplifies the roughest part 16x; prolongation_matrix is that inverse."""
    g = galerkin_matrix()
    eig = torch.linalg.eigvals(g)
    assert eig.imag.abs().max() < 1e-12
    want = sorted(2.0 ** -(a + b) for a in range(3) for b in range(3))
    torch.testing.assert_close(torch.sort(eig.real).values, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(prolongation_matrix() @ g, torch.eye(9, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        prolongate_kernel(torch.full((2, 1, 3, 3), float("nan")))
    with pytest.raises(ValueError, match="3x3"):
        prolongate_kernel(torch.zeros(2, 2, 5, 5))


def _spec(size=8):
    return ModelSpec(size * size, 3, (StageSpec(3, 2, "conv"), StageSpec(4, 2, "conv", 2)),
                     activation="tanh", input_shape=(1, size, size), projection="avgpool")


def test_networks_move_between_resolutions():
    fine = build_model(_spec(8), seed=0, dtype=torch.float64)
    coarse = restrict_model(fine)
    assert coarse.spec.input_shape == (1, 4, 4) and coarse.spec.in_features == 16
    torch.testing.assert_close(coarse.chunks[0].weight, restrict_kernel(fine.chunks[0].weight))
    torch.testing.assert_close(coarse.projections["1"].weight, fine.projections["1"].weight)
    torch.testing.assert_close(coarse.head.weight, fine.head.weight)
    same = restrict_model(fine, adapt=False)
    torch.testing.assert_close(same.chunks[1].weight, fine.chunks[1].weight)
    back = prolongate_model(coarse)
    assert back.spec.input_shape == (1, 8, 8)
    for a, b in zip(back.parameters(), fine.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert coarse(torch.randn(2, 1, 4, 4, dtype=torch.float64)).shape == (2, 3)


def test_bad_resolution_names_the_option():
    with pytest.raises(ValueError, match=r"^--strides: stage 1 downsamples the 3x3 state"):
        restrict_model(build_model(_spec(6), seed=0))         # 6 -> 3, then the stride-2 stage
    with pytest.raises(ValueError, match=r"^--resolution: a 7x7 image cannot be scaled by 0.5"):
        resolution_spec(ModelSpec(49, 3, (StageSpec(3, 2, "conv"),), input_shape=(1, 7, 7)), 0.5)
    with pytest.raises(ValueError, match=r"^--resolution: a 5x5 image cannot be halved"):
        restrict_image(torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"^--resolution needs a conv network"):
        resolution_spec(ModelSpec(2, 3), 0.5)


def test_flattened_classifier_keeps_its_response_on_smooth_states():
    """head="flatten": W_H = 4 R W keeps <W, y> for smooth y that vanish at the border (like
    MNIST digits); the classifier moves as an image."""
    spec = ModelSpec(16 * 16, 3, (StageSpec(2, 1, "conv"),), activation="tanh", input_shape=(1, 16, 16),
                     head="flatten")
    fine = build_model(spec, seed=0, dtype=torch.float64)
    with torch.no_grad():
        x = (torch.arange(16, dtype=torch.float64) + 0.5) / 16
        img = torch.sin(2 * x)[:, None] * torch.cos(x)[None, :]
        signs = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:, None, None, None]
        fine.head.weight.copy_((img[None, None] * signs).expand(3, 2, 16, 16).reshape(3, -1))
    coarse = restrict_model(fine)
    assert coarse.head.weight.shape == (3, 2 * 8 * 8)
    bump = torch.sin(math.pi * x) ** 2
    y = (bump[:, None] * bump[None, :] * (1 + x[None, :])).expand(1, 2, 16, 16)
    fine_logits = fine.head(y)
    coarse_logits = coarse.head(restrict_image(y))
    torch.testing.assert_close(coarse_logits, fine_logits, rtol=0.03, atol=0)
    assert prolongate_model(coarse).head.weight.shape == (3, 2 * 16 * 16)


def _mnist_digit():
    """One real MNIST digit (float64, [1, 1, 28, 28], centred), or skip when the IDX files are absent."""
    import os
    from parml.data import default_mnist_dir, read_idx
    for name in ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
        path = os.path.join(default_mnist_dir() or "/nonexistent", name)
        if os.path.exists(path):
            x = read_idx(path, "images", "mnist")[:1].to(torch.float64) / 255
            return (x - x.mean())[:, None]
    pytest.skip("no MNIST IDX files")


def test_one_conv_on_a_blurred_digit_commutes_with_restriction():
    """End to end on real data: K_H (R y) ~ R (K_h y) for a blurred MNIST digit and a derivative
    stencil (gradient + Laplacian, h-scaled by G), far better than the unadapted stencil."""
    y = gaussian_blur(_mnist_digit(), 1.5)
    s = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64) \
        + torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    target = restrict_image(tf.conv2d(y, s[None, None], padding=1))
    adapted = tf.conv2d(restrict_image(y), restrict_kernel(s)[None, None], padding=1)
    unadapted = tf.conv2d(restrict_image(y), s[None, None], padding=1)
    err = float((adapted - target).norm() / target.norm())
    err_unadapted = float((unadapted - target).norm() / target.norm())
    assert err < 0.3 and err < err_unadapted / 4, (err, err_unadapted)


def test_prolongation_inverts_the_rp_smoothing():
    """Why prolongated kernels misbehave on rough fine images: RP is a blur, so the coarse identity
    comes from a sharpening fine stencil and a generic stencil grows several-fold under G^-1."""
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[1, 1] = 1
    rp = torch.tensor([0.125, 0.75, 0.125], dtype=torch.float64)
    torch.testing.assert_close(restrict_kernel(delta), torch.outer(rp, rp))
    sharp = torch.tensor([-0.5, 2.0, -0.5], dtype=torch.float64)
    torch.testing.assert_close(prolongate_kernel(delta), torch.outer(sharp, sharp))
    s = torch.randn(200, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(prolongate_kernel(s).norm() / s.norm()) > 4
    smooth = torch.ones(3, 3, dtype=torch.float64) + 0.3 * torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)[None, :]
    torch.testing.assert_close(restrict_kernel(prolongate_kernel(smooth)), smooth)

