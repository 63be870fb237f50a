"""Own models with dropout (issue 37, item 6): the protocol accepts a Linen `nn.Dropout` and an
NNX `nnx.Dropout`; training gives every train-mode forward a `dropout` key of its own, drawn
from the step's key (the clean forward, the loss's and each of the attack's), so a step is a
function of (state, batch, key) and a resume draws the same masks; evaluation passes none and
is deterministic. Dropout is made observable by changing only the dropout stream
(`train_step.DROPOUT_STREAM`): with rate 0.5 the step's results change, with rate 0 not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fpcm_jax import attacks, experiment, parallel
from fpcm_jax.data import datasets
from fpcm_jax.evaluation import accuracy
from fpcm_jax.training import checks as training_checks
from fpcm_jax.training import train_step


def dropout_config(name, rate, attack_steps=1):
    config = tiny_config(model__name=f"own_models:{name}", model__widths=None,
                         model__stage_sizes=None, attack__steps=attack_steps,
                         data__crop_padding=0, data__flip=False)
    config.model.kwargs = {"rate": rate}
    return config


def one_step(config, dropout_stream, monkeypatch):
    """(adversarial examples, loss, new params) of one eager training step with the given
    dropout stream; augmentation off, so only the attack's start and dropout are random."""
    monkeypatch.setattr(train_step, "DROPOUT_STREAM", dropout_stream)
    recorded = []
    build_attack = train_step._training_attack
    monkeypatch.setattr(train_step, "_training_attack", lambda *args: (
        lambda attack: lambda *inputs: recorded.append(attack(*inputs)) or recorded[-1])(
            build_attack(*args)))
    model, spec = experiment.build(config)
    tx, learning_rate = train_step.make_optimizer(config.train, steps_per_epoch=5)
    state = train_step.create_state(model, tx, jax.random.key(0), spec.image_size)
    train, _, _ = datasets.load_for(config)
    batch = {"images": jnp.asarray(train.images[:16]), "labels": jnp.asarray(train.labels[:16])}
    step = train_step.make_train_step(model, tx, learning_rate, config, 5)
    new_state, metrics = step(state, batch, jax.random.key(3))
    return np.asarray(recorded[0][0]), float(metrics["loss"]), new_state.params


@pytest.mark.parametrize("name", ["DropoutNet", "NNXDropoutNet"])
def test_the_protocol_accepts_dropout(name):
    config = dropout_config(name, 0.5)
    training_checks.check_training(config)  # the protocol check included
    assert experiment.describe(config)["kwargs"]["rate"] == 0.5


@pytest.mark.parametrize("name", ["DropoutNet", "NNXDropoutNet"])
def test_every_training_forward_draws_dropout_from_the_steps_key(name, monkeypatch):
    """The same step twice: identical (a resume draws the same masks). Another dropout stream
    with rate 0.5: other adversarial examples (the attack's forwards drop units), another loss
    and other weights; with rate 0: the same, to the bit."""
    config = dropout_config(name, 0.5)
    first = one_step(config, 1 << 20, monkeypatch)
    again = one_step(config, 1 << 20, monkeypatch)
    other = one_step(config, 1 << 21, monkeypatch)
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    assert not np.array_equal(first[0], other[0])
    assert first[1] != other[1]
    leaves = lambda params: jax.tree.leaves(params)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(first[2]), leaves(other[2])))
    control = dropout_config(name, 0.0)
    plain, plain_other = (one_step(control, stream, monkeypatch) for stream in (1 << 20, 1 << 21))
    assert np.array_equal(plain[0], plain_other[0]) and plain[1] == plain_other[1]


@pytest.mark.parametrize("name", ["DropoutNet", "NNXDropoutNet"])
def test_evaluation_runs_without_dropout(name):
    """The eval step (as --mode eval and validation run it) gives the same figures twice and
    the accuracy of the model's deterministic output."""
    config = dropout_config(name, 0.5)
    model, spec = experiment.build(config)
    from fpcm_jax import models
    variables = models.init_variables(model, jax.random.key(0), spec.image_size)
    _, _, test = datasets.load_for(config, validation=False)
    split = datasets.Split(test.images[:32], test.labels[:32])
    mesh = parallel.make_mesh()
    step = accuracy.make_eval_step(model, attacks.get("none"), mesh)
    results = [accuracy.evaluate_split(step, variables, split, 16, jax.random.key(i), mesh)
               for i in (0, 1)]
    logits = model.apply(variables, datasets.to_float(split.images), train=False)
    expected = float(np.mean(np.asarray(logits).argmax(1) == split.labels))
    assert results[0]["clean_acc"] == results[1]["clean_acc"] == expected
