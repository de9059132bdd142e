"""pyibp.testing's helpers: a random model is a function of its seed alone."""
import torch

from pyibp.testing import random_model


def test_random_model_weights_follow_the_seed_and_leave_the_global_generator_alone():
    torch.manual_seed(0)
    first, _ = random_model(7)
    torch.manual_seed(123)              # whatever the global generator holds
    second, _ = random_model(7)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    other, _ = random_model(8)
    assert any(a.shape != b.shape or not torch.equal(a, b)
               for a, b in zip(first.state_dict().values(), other.state_dict().values()))
