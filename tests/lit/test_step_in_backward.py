"""StepInBackward: the same updates as a plain optimizer step, with no gradients left after backward."""

from __future__ import annotations

import copy

import pytest
import torch

from cornstarch.lit.optim import OptimizerConfig
from cornstarch.lit.step_in_backward import StepInBackward
from tests.lit.test_module import _run


def two_layer_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("fused", [False, True])
def test_same_parameters_as_a_plain_step_and_no_gradient_left(fused):
    plain, hooked = two_layer_net(), two_layer_net()
    make = lambda m, params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1, fused=fused)  # noqa: E731
    # the second layer is frozen first, then joins the optimizer, as when a freeze stage ends
    plain[2].requires_grad_(False), hooked[2].requires_grad_(False)
    opt_plain, opt_hooked = make(plain, plain[0].parameters()), make(hooked, hooked[0].parameters())
    stepper = StepInBackward(opt_hooked).attach()
    for step in range(4):
        if step == 2:
            for model, optimizer in ((plain, opt_plain), (hooked, opt_hooked)):
                model[2].requires_grad_(True)
                optimizer.add_param_group({"params": list(model[2].parameters())})
            stepper.attach()
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        plain(x).square().mean().backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        hooked(x).square().mean().backward()
        trained = list(hooked[0].parameters()) + (list(hooked[2].parameters()) if step >= 2 else [])
        assert all(p.grad is None for p in trained), "a stepped parameter kept its gradient"
        for a, b in zip(plain.parameters(), hooked.parameters()):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    stepper.detach()
    before = copy.deepcopy(hooked.state_dict())
    hooked(torch.randn(5, 6)).sum().backward()  # detached: backward no longer steps
    assert all(torch.equal(before[k], v) for k, v in hooked.state_dict().items())


def test_lit_module_trains_the_same_with_in_backward(tmp_path):
    """Losses, every parameter and the optimizer's moments after 5 steps (across the freeze-schedule transition)
    equal a plain optimizer step's; no gradient is left on a trained parameter."""
    config = dict(lr=1e-3, lr_groups={"language_model": 5e-4}, warmup_steps=2, schedule="cosine")
    plain, plain_module, plain_trainer = _run(tmp_path / "plain", 5, optimizer=OptimizerConfig(**config))
    hooked, module, trainer = _run(tmp_path / "hooked", 5, optimizer=OptimizerConfig(**config, in_backward=True))
    assert module.stage_index == 1  # the schedule's transition (step 3) happened: new groups were hooked too
    for step in range(5):
        torch.testing.assert_close(hooked[step], plain[step], atol=1e-6, rtol=1e-6)
    want = dict(plain_module.model.named_parameters())
    changed = 0
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p, want[name], atol=1e-6, rtol=1e-5, msg=name)
        assert p.grad is None, f"{name} kept a gradient"
        changed += p.requires_grad
    assert changed > 0 and all(p.requires_grad for p in module.model.language_model.parameters())
    ours, theirs = trainer.optimizers[0], plain_trainer.optimizers[0]
    assert len(ours.state) == len(theirs.state) > 0
    for group, plain_group in zip(ours.param_groups, theirs.param_groups):
        assert group["lr"] == plain_group["lr"]
        for p, q in zip(group["params"], plain_group["params"]):
            assert ours.state[p].keys() == theirs.state[q].keys()  # (no state for parameters without a gradient)
            for key in theirs.state[q].keys() & {"exp_avg", "exp_avg_sq"}:
                torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], atol=1e-7, rtol=1e-4)


def test_in_backward_refuses_gradient_clipping(tmp_path):
    from tests.lit.test_module import make_data, make_module, make_trainer

    module = make_module(optimizer=OptimizerConfig(in_backward=True))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = make_trainer(tmp_path, max_steps=1, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="gradient_clip_val=1.0"):
        trainer.fit(module, datamodule=make_data(n_train=8))
    assert trainer.global_step == 0  # refused before any step: nothing trained
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())
