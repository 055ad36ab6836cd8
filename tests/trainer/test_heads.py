"""The masked BatchNorm of the TSE head is BatchNorm over the valid rows (float64, exact maths)."""
import pytest
import torch

from tbps.trainer.model.tse import TokenSelectionEmbedding


def _boolean_index_reference(head, tokens_BkE, valid_Bk):
    """What the head computed with a boolean index (a host sync on a GPU)."""
    x = torch.nn.functional.normalize(tokens_BkE[valid_Bk], dim=-1)
    bn = head.mlp[1]
    h = head.mlp[0](x)
    h = torch.nn.functional.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                       bn.training, bn.momentum, bn.eps)
    y = head.fc(x) + head.mlp[3](torch.relu(h))
    out = torch.full((*valid_Bk.shape, y.shape[-1]), float("-inf"), dtype=y.dtype)
    out[valid_Bk] = y
    pooled = out.max(dim=1).values
    return torch.where(valid_Bk.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))


def test_masked_batchnorm_equals_batchnorm_over_the_valid_rows():
    torch.manual_seed(0)
    head = TokenSelectionEmbedding(8, 5).double()
    ref = TokenSelectionEmbedding(8, 5).double()
    ref.load_state_dict(head.state_dict())
    tokens = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0],
                          [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for mode in (True, False):
        head.train(mode), ref.train(mode)
        got = head(tokens, valid)
        want = _boolean_index_reference(ref, tokens, valid)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g_got = torch.autograd.grad(got.square().sum(), [tokens, *head.parameters()])
        g_want = torch.autograd.grad(want.square().sum(), [tokens, *ref.parameters()])
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(head.mlp[1], name), getattr(ref.mlp[1], name))
    assert int(head.mlp[1].num_batches_tracked) == 1


def test_cross_encoder_residual_carries_the_words():
    """IRRA's cross encoder replaces the words by their cross-attention over the image: when the
    image tokens are all alike, every caption gives the same first token (an ITM head there
    cannot tell captions apart). With recipe.cross.residual the words stay and it can."""
    from tbps.trainer.model.heads import CrossModalEncoder
    torch.manual_seed(0)
    image = torch.randn(1, 1, 16).expand(2, 6, 16)        # one image token, repeated
    text = torch.randn(2, 5, 16)                           # two different captions
    for residual in (False, True):
        enc = CrossModalEncoder(16, 4, 1, residual=residual).eval()
        with torch.no_grad():
            first = enc(text, image)[:, 0]
        same = torch.allclose(first[0], first[1], atol=1e-5)
        assert same is (not residual)
        if residual:       # exactly the words plus the cross-attention, then the blocks
            x = text + enc.cross(enc.ln_text(text), enc.ln_image(image))
            for block in enc.blocks:
                x = block(x, None)
            torch.testing.assert_close(enc(text, image), enc.ln_post(x))


def test_cross_attention_identity_start():
    """recipe.cross.attention_init=identity: q, k, v and the output map start as the identity, so
    each word's cross-attention is the softmax-weighted mean of the (normalised) image tokens,
    weighted by their dot product with the (normalised) word; nothing else changes."""
    from tbps.trainer.model.heads import CrossModalEncoder
    torch.manual_seed(0)
    clip = CrossModalEncoder(16, 4, 1, residual=True)
    torch.manual_seed(0)
    ident = CrossModalEncoder(16, 4, 1, residual=True, attention_init="identity")
    for (name, a), (_, b) in zip(clip.named_parameters(), ident.named_parameters()):
        if name.startswith("cross."):
            continue
        torch.testing.assert_close(a, b)                    # the same random draws elsewhere
    text, image = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    t, v = ident.ln_text(text), ident.ln_image(image)
    q, k = t.view(2, 5, 4, 4).transpose(1, 2), v.view(2, 7, 4, 4).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)      # head width 4
    want = (weights @ v.view(2, 7, 4, 4).transpose(1, 2)).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(ident.cross(t, v), want)
    with pytest.raises(ValueError, match="attention_init"):
        CrossModalEncoder(16, 4, 1, attention_init="zeros")


@pytest.mark.parametrize("masked", [True, False])
def test_the_cross_encoders_padding_mask_switch(masked):
    """recipe.cross.padding_mask=false (IRRA's authors: no mask) lets the padding after the end
    token change the words' outputs; with the mask they cannot."""
    from types import SimpleNamespace

    from tbps.trainer.model.heads import CrossModalEncoder
    from tbps.trainer.model.retrieval import RetrievalModel
    torch.manual_seed(0)
    model = SimpleNamespace(cross=CrossModalEncoder(16, 4, 2).eval(), cross_padding_mask=masked)
    image, text = torch.randn(1, 6, 16), torch.randn(1, 7, 16)
    eos = torch.tensor([3])                                 # positions 4.. are padding
    other = text.clone()
    other[:, 4:] = torch.randn(1, 3, 16)
    with torch.no_grad():
        a, b = (RetrievalModel.cross_tokens(model, t, eos, image) for t in (text, other))
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) is masked


def test_filler_in_bn_stats_takes_batchnorm_over_every_row_and_pools_the_words():
    """recipe.tse.filler_in_bn_stats (the authors'): the train-mode BatchNorm statistics read
    every slot, filler included (plain BatchNorm1d over all B x k rows), the max-pool only the
    words; the default reads the words alone (the boolean-index reference above)."""
    torch.manual_seed(0)
    head = TokenSelectionEmbedding(8, 5, filler_in_bn_stats=True).double().train()
    tokens = torch.randn(3, 4, 8, dtype=torch.float64)
    words = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    x = torch.nn.functional.normalize(tokens, dim=-1)
    plain = torch.nn.BatchNorm1d(8).double().train()
    plain.load_state_dict(head.mlp[1].state_dict())
    y = head.fc(x) + head.mlp[3](torch.relu(plain(head.mlp[0](x).reshape(12, 8)).view(3, 4, 8)))
    want = y.masked_fill(~words[..., None], float("-inf")).max(dim=1).values
    got = head(tokens, words, stats_Bk=torch.ones_like(words))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.mlp[1].running_var, plain.running_var)
    head.mlp[1].reset_running_stats()
    only_words = _boolean_index_reference(head, tokens, words)
    assert not torch.allclose(head(tokens, words), want)
    torch.testing.assert_close(head(tokens, words), only_words, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("filler", [False, True])
def test_select_text_fills_a_short_captions_slots_with_the_padding_after_its_eos(filler):
    """With the switch a caption of 2 words and k = 4 takes its words (by attention) and the
    two padding tokens right after its EOS; the statistics read all 4, the pooling the words."""
    from types import SimpleNamespace

    from tbps.trainer.model.tse import select_text
    ids = torch.tensor([[7, 1, 2, 9, 0, 0, 0, 0]])            # start, 2 words, EOS at 3, padding
    attn = torch.tensor([[0.0, 0.2, 0.5, 0.3, 0.9, 0.8, 0.0, 0.7]])
    txt = SimpleNamespace(input_ids_BL=ids, eos_B=torch.tensor([3]), attn_BL=attn,
                          tokens_BLE=torch.arange(8.0).view(1, 8, 1).expand(1, 8, 2))
    seen = {}

    class Head:                       # records what select_text hands the TSE head
        filler_in_bn_stats = filler

        def __call__(self, features, valid, stats_Bk=None):
            seen.update(features=features[0, :, 0].tolist(), valid=valid[0].tolist(),
                        stats=None if stats_Bk is None else stats_Bk[0].tolist())

    select_text(Head(), txt, 4)
    if filler:
        assert seen == {"features": [2.0, 1.0, 4.0, 5.0], "valid": [True, True, False, False],
                        "stats": [True, True, True, True]}
    else:
        assert seen == {"features": [2.0, 1.0, 0.0, 0.0], "valid": [True, True, False, False],
                        "stats": None}
