"""Model architectures against the official PyTorch code (via recorded logits) and counts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fpcm_jax import models
from fpcm_jax.runs import convert


def param_count(model):
    variables = models.variables_template(model)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name, fpcm, expected", [
    ("resnet18", True, 11_175_882),    # official ResNet18_FNet 11,176,842 minus 960 unused
    ("resnet18", False, 11_173_962),
    ("wrn-34-10", True, 46_699_194),
    ("wrn-16-2", True, 713_402),
    ("wrn-28-10", False, 36_479_194),  # the standard WRN-28-10 count
])
def test_parameter_counts(name, fpcm, expected):
    assert param_count(models.create(name, fpcm=fpcm)) == expected


def check_tolerance(ours, reference):
    limit = 1e-4 * max(1.0, float(np.abs(reference).max()))
    assert float(np.abs(np.asarray(ours) - reference).max()) <= limit


def check_official(arrays, state_dict, model, epochs_per_run):
    with jax.default_matmul_precision("highest"):  # the reference ran in float32 on a CPU
        check_official_logits(arrays, state_dict, model, epochs_per_run)


def check_official_logits(arrays, state_dict, model, epochs_per_run):
    variables = convert.from_official(state_dict, model)
    forward = jax.jit(lambda v, x, p: model.apply(v, x, train=False, progress=p))
    for epoch in arrays["epochs"]:
        logits = forward(variables, arrays["x_eval"], jnp.float32(epoch / epochs_per_run))
        check_tolerance(logits, arrays[f"logits_eval_{int(epoch)}"])
    # One train-mode forward: batch statistics, and running statistics updated as PyTorch does
    # (unbiased variance, momentum 0.1).
    progress = jnp.float32(arrays["train_epoch"] / epochs_per_run)
    logits, updates = model.apply(variables, arrays["x_train"], train=True, progress=progress,
                                  mutable=["batch_stats"])
    check_tolerance(logits, arrays["logits_train"])
    flat = {convert.torch_key("batch_stats", path): value
            for path, value in traverse_util.flatten_dict(updates["batch_stats"]).items()}
    stats = {key[len("stats/"):]: value for key, value in arrays.items() if key.startswith("stats/")}
    assert set(flat) == set(stats)
    for key, value in stats.items():
        np.testing.assert_allclose(flat[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("lowpass", ["auto", "fft", "matmul"])
def test_resnet18_fpcm_matches_official_logits(official_resnet18, lowpass):
    arrays, state_dict = official_resnet18
    check_official(arrays, state_dict, models.create("resnet18", fpcm_lowpass=lowpass),
                   epochs_per_run=120)


def test_wrn_fpcm_matches_official_logits(official_wrn16_2):
    arrays, state_dict = official_wrn16_2
    check_official(arrays, state_dict, models.create("wrn-16-2"), epochs_per_run=60)


@pytest.mark.parametrize("name, fixture", [("resnet18", "official_resnet18"),
                                           ("wrn-16-2", "official_wrn16_2")])
@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_bfloat16_logits_stay_close_to_float32(name, fixture, train, request):
    arrays, state_dict = request.getfixturevalue(fixture)
    full, mixed = models.create(name), models.create(name, dtype=jnp.bfloat16)
    variables = convert.from_official(state_dict, full)
    apply = lambda model: model.apply(variables, arrays["x_eval"], train=train, progress=1.0,
                                      mutable=["batch_stats"])
    (reference, stats), (ours, mixed_stats) = apply(full), apply(mixed)
    assert ours.dtype == jnp.float32
    difference = float(jnp.abs(ours - reference).max())
    assert 0 < difference <= 0.03 * float(jnp.abs(reference).max())  # > 0: bf16 really ran
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))
    # Parameters and BatchNorm statistics stay float32 in mixed precision.
    for tree in (mixed.init(jax.random.key(0), arrays["x_eval"][:1]), mixed_stats):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}


def test_synthetic_weights_are_the_recorded_ones(official_resnet18, official_wrn16_2):
    for arrays, state_dict in (official_resnet18, official_wrn16_2):
        sums = [np.sum(value, dtype=np.float64) for value in state_dict.values()]
        np.testing.assert_allclose(sums, arrays["weight_sums"], rtol=1e-6, atol=1e-6)


def test_cutoff_schedule_reaches_the_model_without_retracing():
    model = models.create("wrn-10-1", fpcm=True, cutoff_start=0.5, cutoff_end=0.125)
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3), np.float32))
    variables = model.init(jax.random.key(0), x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(variables, x, progress):
        return model.apply(variables, x, progress=progress)

    logits = [forward(variables, x, jnp.float32(p)) for p in (0.0, 0.5, 1.0)]
    assert not np.allclose(logits[0], logits[2])


def test_baseline_has_no_fpcm_and_normalisation_is_configurable():
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3), np.float32))
    baseline = models.create("wrn-10-1", fpcm=False)
    variables = baseline.init(jax.random.key(0), x)
    assert not any(name.startswith("attn") for name in variables["params"])
    raw = models.create("wrn-10-1", fpcm=False, mean=None, std=None)
    assert not np.allclose(baseline.apply(variables, x), raw.apply(variables, x))


def test_bad_model_requests_give_clear_errors():
    with pytest.raises(ValueError, match="valid names"):
        models.create("vgg16")
    with pytest.raises(ValueError, match="6n\\+4"):
        models.create("wrn-30-10")
    model = models.create("resnet18")
    with pytest.raises(ValueError, match="NCHW"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
