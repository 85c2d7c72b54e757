"""Parameters, presets and overrides: valid input resolves, invalid input names the field."""

import json

import pytest

from loraflow.config import SingleParams, load_params_file
from loraflow.errors import ConfigError, LoraflowError
from loraflow.models import resolve_model
from loraflow.plan import plan_run
from loraflow.settings import (
    available_presets,
    expand_dotted,
    load_preset,
    resolve_training_settings,
)

CLS = "sequence-classification"


def test_every_shipped_preset_resolves_for_its_task():
    assert {"classification-small", "causal-lm-llama"} <= set(available_presets())
    for name in available_presets():
        assert resolve_training_settings(name, {}, load_preset(name)["task"]).lora.r > 0


def test_dotted_and_nested_overrides_merge_over_the_preset():
    settings = resolve_training_settings(
        "classification-small", {"lora.r": 4, "lora": {"alpha": 8}, "learning_rate": 0.01}, CLS
    )
    assert (settings.lora.r, settings.lora.alpha, settings.learning_rate) == (4, 8, 0.01)
    assert settings.lora.target_modules == ["query", "value"]  # untouched preset value survives
    assert expand_dotted({"a.b.c": 1, "a.d": 2}) == {"a": {"b": {"c": 1}, "d": 2}}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"learning_rte": 0.1}, "unknown key 'learning_rte' (did you mean 'learning_rate'?)"),
        ({"lora.rank": 4}, "unknown key 'lora.rank' (did you mean 'lora.r'?)"),
        ({"learning_rate": 0}, "overrides.learning_rate: Input should be greater than 0"),
        ({"num_epochs": -1}, "overrides.num_epochs: Input should be greater than 0"),
        ({"batch_size": 0}, "overrides.batch_size: Input should be greater than or equal to 1"),
    ],
)
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        resolve_training_settings("classification-small", overrides, CLS)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'classification-small'"):
        resolve_training_settings("classification-smal", {}, CLS)


def test_preset_for_the_wrong_task_is_refused():
    with pytest.raises(ConfigError, match="is for task 'causal-lm'"):
        resolve_training_settings("causal-lm-llama", {}, CLS)


def test_params_file_yaml_and_json(tmp_path):
    (tmp_path / "p.yaml").write_text("dataset:\n  path: data.csv\ngates:\n  accuracy: 0.9\n")
    (tmp_path / "p.json").write_text(json.dumps({"params": {"dataset": {"path": "x/y.jsonl"}, "seed": 3}}))
    from_yaml = load_params_file(tmp_path / "p.yaml")
    from_json = load_params_file(tmp_path / "p.json")
    assert from_yaml.dataset.resolved_name == "data" and from_yaml.gates == {"accuracy": 0.9}
    assert from_json.dataset.resolved_name == "y" and from_json.seed == 3


@pytest.mark.parametrize(
    "content, expected",
    [
        ("dataset:\n  path: a.csv\nlearning_rate: 1\n", "p.yaml: learning_rate: unknown key"),
        ("dataset:\n  path: a.csv\n  name: ../escape\n", "p.yaml: dataset.name: dataset.name '../escape' is not a safe"),
        ("dataset:\n  path: a.csv\ngates:\n  acuracy: 0.9\n", "did you mean 'accuracy'"),
        ("dataset:\n  path: a.csv\ntask: regression\n", "p.yaml: task: Input should be"),
        ("dataset: [unclosed\n", "p.yaml:"),
        ("{}", "p.yaml: dataset: Field required"),
        ("dataset:\n  path: a.csv\noverrides:\n  lora.rank: 4\n", "p.yaml: overrides: unknown key 'lora.rank' (did you mean 'lora.r'?)"),
        ("dataset:\n  path: a.csv\npreset: nope\n", "p.yaml: preset: unknown preset 'nope'"),
    ],
)
def test_bad_params_file_gives_one_line_with_the_field(tmp_path, content, expected):
    (tmp_path / "p.yaml").write_text(content)
    with pytest.raises(ConfigError) as error:
        load_params_file(tmp_path / "p.yaml")
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_plan_checks_model_targets_gates_and_paths(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,a\n")
    base = {"dataset": {"path": str(data)}, "output_dir": str(tmp_path / "out")}
    plan = plan_run(SingleParams(**base, plan_only=True))
    assert plan.model_path == resolve_model("minilm") and plan.root == str(tmp_path / "out" / "d")
    assert not (tmp_path / "out").exists()  # checks make no folders: a plan-only run leaves none behind

    cases = [
        ({"overrides": {"lora.target_modules": ["q_proj"]}}, "lora.target_modules: ['q_proj'] not found"),
        ({"gates": {"perplexity": 10}}, "not produced by task 'sequence-classification'"),
        ({"dataset": {"path": str(tmp_path / "missing.csv")}}, "dataset.path"),
        ({"model": str(tmp_path)}, "is not a model directory"),
        ({"output_dir": str(data / "sub")}, "output_dir"),
    ]
    for change, expected in cases:
        with pytest.raises(LoraflowError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            plan_run(SingleParams(**{**base, **change}))


def test_lora_targets_are_checked_from_a_memo_after_the_first_run(tmp_path, monkeypatch):
    """The target check builds the model (importing torch) once per user; later runs and plans,
    in any output folder, read the names back, and a wrong target still fails from them."""
    import loraflow.models as models

    monkeypatch.setenv("LORAFLOW_CACHE_DIR", str(tmp_path / "memo"))
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,a\n")
    base = {"dataset": {"path": str(data)}, "output_dir": str(tmp_path / "out")}
    plan_run(SingleParams(**base))
    (memo,) = (tmp_path / "memo").glob("linear-modules-*.json")
    assert {"query", "value"} <= set(json.loads(memo.read_text()))

    def no_build(*args):
        raise AssertionError("the model was built again")

    monkeypatch.setattr(models, "run_model_work", no_build)
    plan_run(SingleParams(**base))
    plan_run(SingleParams(**{**base, "output_dir": str(tmp_path / "elsewhere")}, plan_only=True))
    with pytest.raises(ConfigError, match="not found"):
        plan_run(SingleParams(**{**base, "overrides": {"lora.target_modules": ["q_proj"]}}))
