"""Your own model through the whole pipeline (README "Your own model"): a Flax model named by
import path (`own_models:TinyCNN`, FPCM inside submodules) trains, stops and resumes, is
selected, evaluated with PGD and AutoAttack, analysed (its FPCM layers found wherever they
sit) and reported; the Python entry point with the same network gives identical metrics; an
NNX model runs through the same pipeline; protocol errors are one line before any work; a
run whose model code changed or disappeared says so."""

import hashlib
import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpcm_jax
import own_models
from conftest import tiny_config
from fpcm_jax import experiment
from fpcm_jax.training import checks as training_checks
from fpcm_jax.data import datasets
from fpcm_jax.evaluation import analysis, evaluate
from fpcm_jax.reports import report
from fpcm_jax.runs import checkpoint, loading
from fpcm_jax.training import train
from fpcm_jax.models import imported

SHORT_AUTOATTACK = {"n_iter": 3, "n_queries": 20, "n_target_classes": 2}


def own_config(name="own_models:TinyCNN", kwargs=None, **changes):
    """The tiny config (PGD-1, 2 epochs) with the model given by import path; the registry
    ResNet's fields reset."""
    config = tiny_config(model__name=name, model__widths=None, model__stage_sizes=None,
                         attack__steps=1, train__final_test_attack_steps=1, **changes)
    config.model.kwargs = {"width": 6} if kwargs is None else kwargs
    return config


def train_checked(config, workdir):
    training_checks.check_training(config)
    return train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """(workdir, config) of TinyCNN(width=6) trained 2 epochs, stopped after 13 steps and
    resumed by the same call (the resume is checked in the test)."""
    workdir = tmp_path_factory.mktemp("own") / "run"
    config = own_config()
    stopped = config.copy_and_resolve_references()
    stopped.train.stop_after_steps = 13
    assert train_checked(stopped, workdir)["stopped_at_step"] == 13
    train_checked(config, workdir)
    return workdir, config


def metric_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_own_model_trains_resumes_and_is_selected(own_run):
    workdir, config = own_run
    with open(workdir / "run.json") as handle:
        description = json.load(handle)
    assert description["name"] == "own_models:TinyCNN"
    assert description["kwargs"] == {"width": 6, "num_classes": 10}
    with open(own_models.__file__, "rb") as handle:
        assert description["code"]["sha256"] == hashlib.sha256(handle.read()).hexdigest()
    steps = [line["step"] for line in metric_lines(workdir) if "loss" in line]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 13  # resumed at 14
    for name in ("best_sum", "best_robust"):
        model, variables, info, _ = loading.load_model(str(workdir / name))
        assert info["name"] == "own_models:TinyCNN" and info["selected_by"] == name
        assert isinstance(model, own_models.TinyCNN) and model.width == 6
    with open(workdir / "summary.json") as handle:
        assert json.load(handle)["final_step"] == len(steps)


@pytest.mark.slow
def test_own_model_is_evaluated_analysed_and_reported(own_run, tmp_path):
    workdir, config = own_run
    result = evaluate.run_evaluation(config, str(workdir), ["none", "pgd3", "autoattack"],
                                     num_examples=40, batch_size=20,
                                     autoattack_options=SHORT_AUTOATTACK)
    assert result["model"]["name"] == "own_models:TinyCNN"
    model, variables, _, _ = loading.load_model(str(workdir))
    _, _, test_split = datasets.load_for(config)
    x, y = datasets.to_float(test_split.images[:40]), test_split.labels[:40]
    direct = float(np.mean(np.asarray(model.apply(variables, x, train=False)).argmax(1) == y))
    for name in ("none", "pgd3", "autoattack"):
        assert result["attacks"][name]["clean_acc"] == direct
    assert result["attacks"]["autoattack"]["verified"]["inside_ball_and_box"]
    config.analysis.num_examples, config.analysis.heatmap_examples = 20, 2
    config.analysis.feature_examples, config.analysis.filter_steps = 4, 2
    found = analysis.run_analysis(config, [str(workdir)], str(tmp_path / "analysis"))
    figures = found["models"]["run"]
    assert set(figures["alpha"]) == {"stage_a/freq", "stage_b/freq"}
    assert set(figures["feature_high_frequency_share"]) == {"stage_a/freq", "stage_b/freq"}
    table = report.write_report([str(workdir)], str(tmp_path / "table"))
    assert "run" in open(table["files"][0]).read()


@pytest.mark.slow
def test_python_entry_point_gives_the_same_run(own_run, tmp_path):
    """fpcm_jax.train_and_evaluate(config, workdir, model=TinyCNN(width=6)) (uninterrupted)
    and the import-path run (stopped and resumed): the same losses, validation and test
    figures, to the bit."""
    workdir, config = own_run
    plain = tiny_config(model__widths=None, model__stage_sizes=None, attack__steps=1,
                        train__final_test_attack_steps=1)
    fpcm_jax.train_and_evaluate(plain, str(tmp_path / "api"),
                                model=own_models.TinyCNN(width=6))
    figures = lambda w: [{k: v for k, v in line.items() if k not in ("time",)}
                         for line in metric_lines(w)]
    assert figures(tmp_path / "api") == figures(workdir)
    with open(tmp_path / "api" / "summary.json") as a, open(workdir / "summary.json") as b:
        api_summary, cli_summary = json.load(a), json.load(b)
    for key in ("test_clean_acc", "test_pgd1_acc", "final_step"):
        assert api_summary[key] == cli_summary[key]


def test_a_model_with_a_distinctive_output_is_the_one_evaluated(tmp_path):
    """Constant7 predicts class 7 for every image: the report's clean accuracy is the share
    of 7s, which no trained model would give; also through fpcm_jax.evaluation.evaluate with the model
    and variables given in Python (fpcm_jax.evaluate_model)."""
    config = own_config("own_models:Constant7", kwargs={})
    model = experiment.model_from_description(experiment.describe(config))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    checkpoint.save_variables(str(tmp_path / "ckpt"), variables, experiment.describe(config))
    _, _, test_split = datasets.load_for(config)
    sevens = float(np.mean(test_split.labels[:60] == 7))
    for result in (evaluate.run_evaluation(config, str(tmp_path / "cli"), ["none"],
                                           str(tmp_path / "ckpt"), num_examples=60),
                   fpcm_jax.evaluate_model(config, str(tmp_path / "api"), ["none"],
                                     model=own_models.Constant7(), variables=variables,
                                     num_examples=60)):
        assert result["attacks"]["none"]["clean_acc"] == sevens
        assert result["model"]["name"] == "own_models:Constant7"


@pytest.mark.slow
def test_nnx_model_runs_through_the_pipeline_with_its_batchnorm(tmp_path):
    """An NNX class (wrapped by nnx.bridge.ToLinen): trained, its running statistics moved
    from their start and used in evaluation mode, evaluated and its alpha analysed."""
    config = own_config("own_models:NNXNet", kwargs={"width": 4}, train__epochs=1)
    train_checked(config, tmp_path / "run")
    model, variables, info, _ = loading.load_model(str(tmp_path / "run"))
    stats = variables["batch_stats"]["bn"]
    assert float(jnp.abs(stats["mean"]).max()) > 1e-3  # updated by training (started at 0)
    _, _, test_split = datasets.load_for(config)
    x = datasets.to_float(test_split.images[:16])
    eval_logits = model.apply(variables, x, train=False)
    zeroed = {**variables, "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"])}
    assert not np.allclose(eval_logits, model.apply(zeroed, x, train=False))  # uses them
    result = evaluate.run_evaluation(config, str(tmp_path / "run"), ["none", "pgd2"],
                                     num_examples=20, batch_size=20)
    assert result["attacks"]["pgd2"]["robust_acc"] <= result["attacks"]["none"]["clean_acc"]
    alphas = analysis.Analyzer(model, variables).alphas(np.asarray(x))
    assert set(alphas) == {"fpcm"} and alphas["fpcm"].shape == (16, 4)


@pytest.mark.parametrize("name, kwargs, changes, message", [
    ("no_such_module:Net", {}, {}, "cannot import the model 'no_such_module:Net'"),
    ("own_models:Missing", {}, {}, "module 'own_models' has no 'Missing'"),
    ("own_models:NOT_A_MODEL", {}, {}, "is a int, not a Flax module"),
    ("own_models:NoProgress", {}, {}, "must take (x, train, progress)"),
    ("own_models:WrongShape", {}, {}, "returns (2, 1) for 2 images"),
    ("own_models:ExtraCollection", {}, {}, "collection(s) ['counter']"),
    ("own_models:TinyCNN", {"depth": 3}, {}, "unexpected keyword argument 'depth'"),
    ("own_models:TinyCNN", {}, {"model__fpcm": False}, "model.fpcm=False applies to the "
                                                        "registry's models"),
    ("own_models:NNXNet", {}, {"model__dtype": "bfloat16"}, "needs a model that takes `dtype`"),
    ("resnet18", {"width": 3}, {}, "applies to a model given by import path"),
])
def test_protocol_errors_are_one_line_before_any_work(tmp_path, name, kwargs, changes,
                                                       message):
    config = own_config(name, kwargs=kwargs, **changes)
    if name == "resnet18":
        config.model.widths = (8, 8, 8, 8)
    with pytest.raises(ValueError) as raised:
        train_checked(config, tmp_path / "run")
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not os.path.exists(tmp_path / "run")


def test_changed_or_missing_model_code_is_named_on_eval_and_resume(tmp_path, capsys,
                                                                    monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    module = f"user_net_{os.getpid()}"
    source = code / f"{module}.py"
    source.write_text("from own_models import TinyCNN as Net\n")
    monkeypatch.syspath_prepend(str(code))
    config = own_config(f"{module}:Net", kwargs={"width": 2})
    description = experiment.describe(config)
    model = experiment.model_from_description(description)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    saved = str(tmp_path / "ckpt")
    checkpoint.save_variables(saved, variables, description)
    loading.load_model(saved)
    assert "changed" not in capsys.readouterr().err
    source.write_text("# edited\nfrom own_models import TinyCNN as Net\n")
    loading.load_model(saved)
    err = capsys.readouterr().err
    assert f"the code of the model {module}:Net changed since it was recorded" in err
    assert description["code"]["sha256"] in err
    from fpcm_jax.runs import run_dir
    os.makedirs(tmp_path / "run")
    with open(tmp_path / "run" / "run.json", "w") as handle:
        json.dump(description, handle)
    run_dir.RunDirectory(str(tmp_path / "run"), experiment.describe(config))
    assert "warning: resuming, but the code of the model" in capsys.readouterr().err
    source.unlink()
    monkeypatch.delitem(sys.modules, module)
    importlib.invalidate_caches()
    with pytest.raises(imported.ModelProtocolError, match="cannot import the model") as raised:
        loading.load_model(saved)
    assert str(source) in str(raised.value) and "\n" not in str(raised.value)


def test_the_code_fingerprint_names_the_changed_file_of_the_package(tmp_path, monkeypatch):
    """Issue 37, item 7: a model defined in a package (re-exported by its __init__, and again
    by a module outside it) is fingerprinted with every source file of the packages involved,
    and an edit to a helper file or to the defining file is named, alone."""
    from fpcm_jax.models import imported
    package = f"netpkg_{os.getpid()}"
    root = tmp_path / "code"
    (root / package).mkdir(parents=True)
    files = {"__init__.py": "from .nets import Net\n",
             "nets.py": ("import flax.linen as nn\nfrom . import helpers\n\n\n"
                         "class Net(nn.Module):\n    num_classes: int = 10\n\n"
                         "    @nn.compact\n    def __call__(self, x, train=False, progress=1.0):\n"
                         "        return nn.Dense(self.num_classes)(x.reshape(len(x), -1) * "
                         "helpers.SCALE)\n"),
             "helpers.py": "SCALE = 1.0\n"}
    for name, text in files.items():
        (root / package / name).write_text(text)
    (root / f"outside_{os.getpid()}.py").write_text(f"from {package}.nets import Net\n")
    monkeypatch.syspath_prepend(str(root))
    for import_path in (f"{package}:Net", f"outside_{os.getpid()}:Net"):
        recorded = imported.code_fingerprint(import_path)
        assert {os.path.basename(path) for path in recorded["files"]} >= set(files)
        assert imported.code_changes(recorded, import_path) is None
        for name, edit in (("helpers.py", "SCALE = 2.0\n"), ("nets.py", files["nets.py"] + "#\n")):
            path = str(root / package / name)
            (root / package / name).write_text(edit)
            message = imported.code_changes(recorded, import_path)
            assert f"{path}: SHA-256 {recorded['files'][path]} then, " in message
            others = [p for p in recorded["files"] if p != path]
            assert not any(f"{other}:" in message for other in others)
            (root / package / name).write_text(files[name])


def test_a_model_of_the_wrong_shape_is_refused_at_evaluation(tmp_path, monkeypatch):
    """Issue 37, item 13: at evaluation time (not only when training starts) a model whose
    logits do not fit the dataset is one line, nothing written: given in Python, and loaded
    from a checkpoint whose code changed since (10 logits then, 3 now)."""
    import sys
    model = own_models.WrongShape()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"returns logits of shape \(1, 1\) for one image; "
                                         r"digits has 10 classes"):
        fpcm_jax.evaluate_model(own_config("own_models:WrongShape", kwargs={}),
                                str(tmp_path / "given"), ["none"], model=model,
                                variables=variables)
    module = f"shape_net_{os.getpid()}"
    source = tmp_path / f"{module}.py"
    net = ("import flax.linen as nn\n\n\nclass Net(nn.Module):\n    num_classes: int = 10\n\n"
           "    @nn.compact\n    def __call__(self, x, train=False, progress=1.0):\n"
           "        return nn.Dense({})(x.reshape(len(x), -1))\n")
    source.write_text(net.format("self.num_classes"))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = own_config(f"{module}:Net", kwargs={})
    description = experiment.describe(config)
    built = experiment.model_from_description(description)
    saved = str(tmp_path / "ckpt")
    checkpoint.save_variables(saved, built.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))),
                              description)
    source.write_text(net.format(3))
    monkeypatch.delitem(sys.modules, module)  # a new process would import the file anew
    with pytest.raises(imported.ModelProtocolError, match=r"returns \(2, 3\) for 2 images"):
        evaluate.run_evaluation(config, str(tmp_path / "eval"), ["none"], saved)
    assert not os.path.exists(tmp_path / "eval")
