import pytest
import torch

from wsigraph.nn import GatedAttentionAggregation

SIZES = [5, 1, 9, 3]
IN_CHANNELS = 6


def random_bags(sizes=SIZES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.randn(batch.numel(), IN_CHANNELS, generator=generator)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(sizes).cumsum(0)])
    return x, batch, ptr


def dense_reference(layer, x, log_prior=None):
    r"""One slide, written out with dense tensors: a = softmax(w^T (tanh(Vx) * sigmoid(Ux)))."""
    hidden = torch.tanh(x @ layer.lin_tanh.weight.T + layer.lin_tanh.bias)
    hidden = hidden * torch.sigmoid(x @ layer.lin_gate.weight.T + layer.lin_gate.bias)
    scores = hidden @ layer.lin_score.weight.T + layer.lin_score.bias  # [n, heads]
    if log_prior is not None:
        scores = scores + log_prior.reshape(x.size(0), -1)
    attention = torch.softmax(scores, dim=0)
    return attention.T @ x, attention  # [heads, F], [n, heads]


@pytest.mark.parametrize("heads", [1, 3])
def test_matches_dense_per_slide_reference(heads):
    torch.manual_seed(1)
    x, batch, ptr = random_bags()
    layer = GatedAttentionAggregation(IN_CHANNELS, 4, heads=heads)
    out, attention, scores = layer(x, batch, dim_size=len(SIZES), return_attention=True)
    expected_shape = (len(SIZES), IN_CHANNELS) if heads == 1 else (len(SIZES), heads, IN_CHANNELS)
    assert out.shape == expected_shape
    assert attention.shape == scores.shape == (x.size(0), heads)
    sums = torch.zeros(len(SIZES), heads).index_add_(0, batch, attention)
    torch.testing.assert_close(sums, torch.ones(len(SIZES), heads))
    out = out.view(len(SIZES), heads, IN_CHANNELS)
    for b in range(len(SIZES)):
        rows = slice(int(ptr[b]), int(ptr[b + 1]))
        pooled, slide_attention = dense_reference(layer, x[rows])
        torch.testing.assert_close(out[b], pooled)
        torch.testing.assert_close(attention[rows], slide_attention)
        # Batched equals the same slide on its own.
        single = layer(x[rows]).view(heads, IN_CHANNELS)
        torch.testing.assert_close(out[b], single)
    # ptr path (segment reductions) gives the same result as the index path.
    torch.testing.assert_close(layer(x, ptr=ptr).view_as(out), out)


def test_log_prior():
    torch.manual_seed(2)
    x, batch, ptr = random_bags()
    layer = GatedAttentionAggregation(IN_CHANNELS, 4, heads=2)
    log_prior = torch.randn(x.size(0), 2)
    log_prior[0, 0] = float("-inf")
    log_prior[7, :] = float("-inf")
    # Slide 1 (a single node) loses its only node for head 1.
    log_prior[5, 1] = float("-inf")
    log_prior.requires_grad_(True)
    out, attention, _ = layer(x, batch, dim_size=len(SIZES), log_prior=log_prior,
                              return_attention=True)
    assert attention[0, 0] == 0 and (attention[7] == 0).all() and attention[5, 1] == 0
    assert torch.isfinite(out).all()
    assert (out[1, 1] == 0).all()  # fully removed slide/head pools to zero
    for b in (0, 2, 3):
        rows = slice(int(ptr[b]), int(ptr[b + 1]))
        pooled, slide_attention = dense_reference(layer, x[rows], log_prior[rows].detach())
        torch.testing.assert_close(out[b], pooled)
        torch.testing.assert_close(attention[rows], slide_attention)
    out.sum().backward()
    assert torch.isfinite(log_prior.grad).all()
    # A one-dimensional prior is shared by all heads.
    shared = torch.randn(x.size(0))
    torch.testing.assert_close(layer(x, batch, log_prior=shared),
                               layer(x, batch, log_prior=shared[:, None].expand(-1, 2)))


def test_empty_slide_and_half_precision():
    x, batch, _ = random_bags(sizes=[3, 4])
    layer = GatedAttentionAggregation(IN_CHANNELS, 4)
    # A third slide without nodes pools to zero.
    out = layer(x, batch, dim_size=3)
    assert out.shape == (3, IN_CHANNELS) and (out[2] == 0).all()
    layer_bf16 = GatedAttentionAggregation(IN_CHANNELS, 4).to(torch.bfloat16)
    _, attention, _ = layer_bf16(x.bfloat16(), batch, dim_size=2, return_attention=True)
    assert attention.dtype == torch.float32


def test_dropout_reset_and_repr():
    layer = GatedAttentionAggregation(IN_CHANNELS, 4, heads=2, dropout=0.5)
    assert repr(layer) == "GatedAttentionAggregation(6, 4, heads=2)"
    x, batch, _ = random_bags()
    layer.eval()
    torch.testing.assert_close(layer(x, batch), layer(x, batch))
    before = layer.lin_score.weight.clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.lin_score.weight)
