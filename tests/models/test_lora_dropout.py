"""kohya's rank and module dropout on peft LoRA layers (models/lora_dropout.py): the math on a tiny Linear and Conv2d."""

import pytest
import torch

from stablediff.models.adapters import ADAPTER
from stablediff.models.lora_dropout import drop_ranks, dropout_settings, install_lora_dropout, peft_keys
from tests.finetune.lora_fixtures import add_trained_lora

RANK = 8


class Tiny(torch.nn.Module):
    """One Linear on (B, L, 6) tokens and one 3x3 Conv2d on (B, 3, 5, 5) maps, as in a UNet block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, tokens: torch.Tensor, maps: torch.Tensor):
        return self.proj(tokens), self.conv(maps)


def lora_model(rank_dropout: float = 0.0, module_dropout: float = 0.0) -> Tiny:
    model = add_trained_lora(Tiny(), ["proj", "conv"], RANK, alpha=4.0, seed=1)  # lora_B random: the branch shows
    install_lora_dropout(model, rank_dropout, module_dropout)
    return model


def inputs(batch: int = 4):
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, 6, generator=generator), torch.randn(batch, 3, 5, 5, generator=generator)


def branch(layer, x, mask=None):
    """The LoRA branch computed by hand: lora_B(mask * lora_A(x)) * alpha / r; mask shaped like lora_A's output."""
    was_training = layer.training
    layer.eval()  # lora_A without the hooks
    with torch.no_grad():
        down = layer.lora_A[ADAPTER](x)
        out = layer.lora_B[ADAPTER](down if mask is None else down * mask) * layer.scaling[ADAPTER]
    layer.train(was_training)
    return out


def test_drop_ranks_zeroes_whole_rank_components_per_sample_and_scales_the_kept_by_one_over_one_minus_p():
    torch.manual_seed(0)
    tokens = drop_ranks(torch.ones(256, 3, RANK), 0.25, rank_dim=-1)  # (B, L, r): a Linear's lora_A output
    assert torch.equal(tokens.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert torch.equal(tokens, tokens[:, :1].expand_as(tokens))  # one draw per (sample, rank), not per token
    assert abs((tokens == 0).float().mean().item() - 0.25) < 0.03  # 2048 draws
    maps = drop_ranks(torch.ones(64, RANK, 5, 5), 0.5, rank_dim=1)  # (B, r, H, W): a LoCon's
    assert torch.equal(maps, maps[:, :, :1, :1].expand_as(maps))  # the mask broadcasts over H, W
    assert torch.equal(maps.unique(), torch.tensor([0.0, 2.0]))


@pytest.mark.parametrize("name", ["proj", "conv"])
def test_rank_dropout_is_the_branch_with_the_drawn_ranks_removed_and_rescaled(name):
    model, x = lora_model(rank_dropout=0.5).train(), inputs()
    layer, args = getattr(model, name), x[0] if name == "proj" else x[1]
    torch.manual_seed(7)
    out = layer(args)
    torch.manual_seed(7)  # the same draw, by hand: kept where rand >= p, (B, r) broadcast
    keep = (torch.rand(len(args), RANK) >= 0.5).float() / 0.5
    mask = keep[:, None, :] if name == "proj" else keep[:, :, None, None]
    expected = layer.base_layer(args).detach() + branch(layer, args, mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert 0 < (keep == 0).sum() < keep.numel()


def test_module_dropout_skips_the_whole_branch_of_a_forward_without_a_rescale_and_trains_nothing_then():
    model, (tokens, _) = lora_model(module_dropout=0.5).train(), inputs()
    layer, tokens = model.proj, tokens.requires_grad_(True)
    base = layer.base_layer(tokens).detach()
    whole = base + branch(layer, tokens)
    torch.manual_seed(3)
    outcomes = []
    for _ in range(200):
        out = layer(tokens)
        skipped = torch.equal(out, base)
        assert skipped or torch.allclose(out, whole, rtol=0, atol=1e-6)
        if skipped and not outcomes.count(True):  # a skipped forward leaves the adapters without a gradient
            out.sum().backward()
            assert layer.lora_A[ADAPTER].weight.grad is None and layer.lora_B[ADAPTER].weight.grad is None
        outcomes.append(skipped)
        assert not layer.disable_adapters  # the skip lasts one forward
    assert 70 < sum(outcomes) < 130  # p = 0.5 of 200 forwards (kohya: one draw per forward)


def test_p_zero_installs_nothing_and_is_the_plain_lora():
    plain, model, x = lora_model().train(), lora_model(), inputs()
    assert install_lora_dropout(model, 0.0, 0.0) == 0
    for got, expected in zip(model.train()(*x), plain(*x)):
        assert torch.equal(got, expected)


def test_eval_mode_is_the_plain_lora_and_draws_nothing():
    plain, model, x = lora_model().eval(), lora_model(rank_dropout=0.5, module_dropout=0.5).eval(), inputs()
    rng = torch.get_rng_state()
    with torch.no_grad():
        for _ in range(5):
            for got, expected in zip(model(*x), plain(*x)):
                assert torch.equal(got, expected)
    assert torch.equal(torch.get_rng_state(), rng)  # validation and sampling leave the training RNG alone


def test_the_draws_follow_the_global_seed():
    model, x = lora_model(rank_dropout=0.3, module_dropout=0.3).train(), inputs(8)

    def outputs(seed):
        torch.manual_seed(seed)
        return [t.detach() for _ in range(4) for t in model(*x)]

    assert all(torch.equal(a, b) for a, b in zip(outputs(11), outputs(11)))
    assert not all(torch.equal(a, b) for a, b in zip(outputs(11), outputs(12)))


def test_the_config_record_keeps_the_dropouts_that_are_on_and_peft_gets_the_rest():
    record = {"r": 4, "lora_alpha": 4.0, "rank_dropout": 0.1, "module_dropout": 0.0}
    assert peft_keys(record) == {"r": 4, "lora_alpha": 4.0}
    assert dropout_settings(record) == {"rank_dropout": 0.1}
    assert dropout_settings(None) == {} and dropout_settings({"r": 4}) == {}


def test_a_probability_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        install_lora_dropout(lora_model(), rank_dropout=1.0)
