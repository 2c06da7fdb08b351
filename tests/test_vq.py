"""Product quantizer: exact nearest codewords, straight-through gradients, codebook health."""

import torch

from metarec_dist.model.vq import VectorQuantizer, VQConfig, nearest_codewords


def brute_force_codes(z, codebooks):
    m, k, d = codebooks.shape
    sub = z.reshape(-1, m, d)
    codes = torch.empty(sub.shape[0], m, dtype=torch.long)
    for n in range(sub.shape[0]):
        for book in range(m):
            distances = [float(((sub[n, book] - codebooks[book, c]) ** 2).sum()) for c in range(k)]
            codes[n, book] = min(range(k), key=distances.__getitem__)
    return codes


def test_assignment_equals_brute_force_nearest_codeword_search():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(VQConfig(num_codebooks=3, codewords=10), width=12)
    z = torch.randn(50, 12)
    out = quantizer(z)
    assert torch.equal(out.codes, brute_force_codes(z, quantizer.codebooks.detach()))
    assert torch.equal(nearest_codewords(z.reshape(50, 3, 4), quantizer.codebooks.detach()), out.codes)


def test_quantized_output_is_the_lookup_of_its_codes():
    torch.manual_seed(1)
    quantizer = VectorQuantizer(VQConfig(num_codebooks=2, codewords=5), width=8)
    out = quantizer(torch.randn(7, 3, 8))
    books = quantizer.codebooks.detach()
    lookup = torch.stack([books[b][out.codes[..., b]] for b in range(2)], dim=-2).reshape(7, 3, 8)
    assert torch.allclose(out.vectors, lookup, atol=1e-6)


def test_straight_through_passes_gradients_to_the_input_and_losses_to_the_codebook():
    torch.manual_seed(2)
    quantizer = VectorQuantizer(VQConfig(num_codebooks=2, codewords=4, commitment=0.5), width=6)
    z = torch.randn(5, 6, requires_grad=True)
    out = quantizer(z)
    (out.vectors * torch.arange(6.0)).sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, torch.arange(6.0).expand(5, 6))  # identity through the quantizer
    assert quantizer.codebooks.grad is None or not quantizer.codebooks.grad.any()
    z.grad = None
    out.loss.backward()
    assert quantizer.codebooks.grad.abs().sum() > 0  # codebook loss moves codewords
    assert z.grad.abs().sum() > 0  # commitment loss moves the inputs


def test_health_reports_perplexity_and_dead_codes():
    quantizer = VectorQuantizer(VQConfig(num_codebooks=1, codewords=4), width=2)
    with torch.no_grad():
        quantizer.codebooks.copy_(torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0]]]))
    quantizer.train()
    quantizer(torch.tensor([[0.1, 0.0], [9.0, 0.0], [0.0, 9.0], [0.2, 0.1]]))
    health = quantizer.health()
    assert health["dead_fraction"] == 0.25
    expected = torch.exp(-(torch.tensor([0.5, 0.25, 0.25]) * torch.tensor([0.5, 0.25, 0.25]).log()).sum())
    assert abs(health["perplexity"] - float(expected)) < 1e-6


def test_dead_codewords_are_reinitialised_from_recent_inputs():
    quantizer = VectorQuantizer(VQConfig(num_codebooks=1, codewords=3), width=2)
    with torch.no_grad():
        quantizer.codebooks.copy_(torch.tensor([[[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0]]]))
    quantizer.train()
    inputs = torch.tensor([[1.0, 1.0], [2.0, 0.5], [0.5, 2.0]])
    quantizer(inputs)
    replaced = quantizer.reinit_dead_codes(torch.Generator().manual_seed(0))
    assert replaced == 2
    for code in (1, 2):
        assert any(torch.equal(quantizer.codebooks.detach()[0, code], row) for row in inputs)
    assert torch.equal(quantizer.codebooks.detach()[0, 0], torch.zeros(2))  # the live code is kept
    assert quantizer.usage.sum() == 0


def brute_force_residual(z, codebooks):
    codes, residual = [], z.clone()
    for book in codebooks:
        distances = ((residual[:, None, :] - book[None]) ** 2).sum(-1)
        code = distances.argmin(dim=1)
        codes.append(code)
        residual = residual - book[code]
    return torch.stack(codes, dim=1), z - residual


def test_residual_assignment_equals_greedy_brute_force_and_sums_its_codewords():
    torch.manual_seed(3)
    quantizer = VectorQuantizer(VQConfig(kind="residual", num_codebooks=3, codewords=8), width=5)
    z = torch.randn(40, 5) * 0.3
    out = quantizer(z)
    codes, quantized = brute_force_residual(z, quantizer.codebooks.detach())
    assert torch.equal(out.codes, codes)
    assert torch.allclose(out.vectors, quantized, atol=1e-6)


def test_more_residual_levels_approximate_closer():
    torch.manual_seed(4)
    z = torch.randn(256, 8)
    errors = []
    for levels in (1, 2, 4):
        quantizer = VectorQuantizer(VQConfig(kind="residual", num_codebooks=levels, codewords=16), width=8)
        with torch.no_grad():  # data-initialised codebooks: level l from residuals of level l-1
            residual = z.clone()
            for level in range(levels):
                quantizer.codebooks[level] = residual[torch.randperm(256)[:16]]
                _, approx = brute_force_residual(z, quantizer.codebooks[: level + 1])
                residual = z - approx
        errors.append(float((quantizer(z).vectors - z).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]


def test_data_initialisation_places_every_codeword_on_a_quantized_vector():
    torch.manual_seed(5)
    z = torch.randn(100, 8) * 3 + 10  # far from the random initial codebook
    for kind in ("product", "residual"):
        quantizer = VectorQuantizer(VQConfig(kind=kind, num_codebooks=2, codewords=16), width=8)
        quantizer.initialize_from(z, torch.Generator().manual_seed(0))
        books = quantizer.codebooks.detach()
        first_level = z[:, :4] if kind == "product" else z
        for codeword in books[0]:
            assert (first_level - codeword).abs().sum(dim=1).min() < 1e-5
        quantizer.train()
        quantizer(z)
        assert quantizer.health()["dead_fraction"] < 0.5


def test_normalized_quantizer_assigns_by_direction_whatever_the_scale():
    torch.manual_seed(6)
    quantizer = VectorQuantizer(VQConfig(num_codebooks=2, codewords=16, normalize=True), width=8)
    z = torch.randn(40, 8)
    small, large = quantizer(z * 0.01), quantizer(z * 100)
    assert torch.equal(small.codes, large.codes)
    unit = torch.nn.functional.normalize(z, dim=-1)
    assert torch.equal(small.codes, brute_force_codes(unit, quantizer.codebooks.detach()))
    quantizer.initialize_from(z * 50, torch.Generator().manual_seed(0))  # seeded on the sphere too
    for codeword in quantizer.codebooks.detach()[0]:
        assert (unit[:, :4] - codeword).abs().sum(dim=1).min() < 1e-5


def test_nearest_codewords_in_chunks_equal_the_whole_search():
    torch.manual_seed(4)
    sub, books = torch.randn(50, 3, 4), torch.randn(3, 10, 4)
    whole = brute_force_codes(sub.reshape(50, 12), books)
    for rows in (1, 7, 50, 512):  # chunk edges inside, at and past the end
        assert torch.equal(nearest_codewords(sub, books, rows=rows), whole)
