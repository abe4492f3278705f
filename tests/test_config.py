"""moetrain.config: loading order, type coercion, error messages, validation, round trip."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrain import config as C
from moetrain.config import ConfigError, RunConfig, load_config, save_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [C.ModelConfig, C.MoEConfig, C.DataConfig, C.TrainConfig, C.ParallelConfig, C.ExportConfig, RunConfig]


#: The smallest recipe: an empty file is an error (issue 12).
MINIMAL = "task: translation\n"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path: Path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message and str(path) in message  # one line, names the file
    return info.value


# --- defaults and precedence ------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_or_comment_only_file_is_an_error(tmp_path, text):
    # issue 12: an empty recipe used to run silently with every default
    with pytest.raises(ConfigError, match="empty or holds only comments"):
        load_config(write(tmp_path, text))


def test_minimal_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "task: translation\n"))
    assert cfg == RunConfig(name="recipe")  # name defaults to the file stem
    assert cfg.moe.num_experts == 8 and cfg.train.adam_betas == (0.9, 0.98)
    assert cfg.moe.capacity_factor == 1.25 and cfg.moe.eval_capacity_factor is None


def test_defaults_pass_validation():
    C.validate(RunConfig())


def test_preset_then_file_then_overrides(tmp_path):
    path = write(tmp_path, """
        model: {preset: switch-tiny, d_ff: 99, num_layers: 3}
        moe: {num_experts: 4}
    """)
    cfg = load_config(path, ["model.num_layers=5"])
    assert cfg.model.d_model == 64  # preset
    assert cfg.model.d_ff == 99  # file beats preset
    assert cfg.moe.num_experts == 4  # file beats preset (other section)
    assert cfg.model.num_layers == 5  # --set beats file
    assert cfg.model.num_decoder_layers == 2  # preset


def test_preset_chosen_by_override_still_loses_to_file_keys(tmp_path):
    path = write(tmp_path, "model: {preset: switch-tiny, d_ff: 99}\n")
    cfg = load_config(path, ["model.preset=switch-base-32"])
    assert cfg.model.preset == "switch-base-32"
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.moe.num_experts) == (768, 12, 32)
    assert cfg.model.d_ff == 99


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_every_preset_builds_and_validates(tmp_path, name):
    cfg = load_config(write(tmp_path, f"model: {{preset: {name}}}\n"))
    for dotted, value in C.PRESETS[name].items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value


def test_switch_base_preset_matches_published_sizes(tmp_path):
    cfg = load_config(write(tmp_path, "model: {preset: switch-base-128}\n"))
    m = cfg.model
    assert (m.d_model, m.d_ff, m.d_kv, m.num_heads, m.num_layers, m.num_decoder_layers, m.vocab_size) == (
        768, 3072, 64, 12, 12, 12, 32128)
    assert (cfg.moe.num_experts, cfg.moe.sparse_step) == (128, 2)


# --- coercion -----------------------------------------------------------------------------


def test_pyyaml_reads_exponent_without_dot_as_string():
    # The reason the loader coerces: YAML 1.1 needs "1.0e-3" for a float.
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}


def test_exponent_strings_are_coerced(tmp_path):
    path = write(tmp_path, "train: {lr: 1e-3, adam_eps: 1e-9, max_steps: 1e4, adam_betas: [0.9, 1e-1]}\n")
    cfg = load_config(path, ["moe.z_coef=1e-4"])
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.adam_eps == 1e-9
    assert cfg.train.max_steps == 10000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.adam_betas == (0.9, 0.1)
    assert cfg.moe.z_coef == 1e-4


def test_ints_become_floats_and_lists_become_tuples(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 1, adam_betas: [0, 0.5]}\n"))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.adam_betas == (0.0, 0.5) and isinstance(cfg.train.adam_betas, tuple)


def test_null_for_optional_fields(tmp_path):
    cfg = load_config(write(tmp_path, "moe: {capacity_factor: null}\n"), ["data.cache_dir=null"])
    assert cfg.moe.capacity_factor is None and cfg.data.cache_dir is None


def test_empty_section_is_allowed(tmp_path):
    assert load_config(write(tmp_path, "moe:\ntrain:\n")).moe == C.MoEConfig()
    # An empty section does not erase what a preset put there.
    cfg = load_config(write(tmp_path, "model:\nmoe:\n"), ["model.preset=switch-tiny"])
    assert (cfg.model.d_model, cfg.moe.num_experts) == (64, 4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 999), st.integers(-12, 3))
def test_exponent_without_dot_is_coerced(tmp_path_factory, mantissa, exponent):
    text = f"{mantissa}e{exponent}"  # no dot: PyYAML gives a string
    path = write(tmp_path_factory.mktemp("h"), f"train: {{lr: {text}}}\n")
    assert load_config(path).train.lr == float(text)


# --- errors ------------------------------------------------------------------------------------


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "moe:\n  num_expert: 16\n")
    err = load_error(path)
    message = str(err)
    assert message.startswith(f"{path}: unknown key 'moe.num_expert'")
    assert "did you mean 'moe.num_experts'?" in message
    assert "Valid keys in 'moe':" in message and "top_k" in message
    assert err.key == "moe.num_expert" and err.path == str(path)


def test_unknown_key_from_override_says_so(tmp_path):
    message = str(load_error(write(tmp_path, MINIMAL), ["train.warmup_step=1"]))
    assert "unknown key 'train.warmup_step'" in message and "did you mean 'train.warmup_steps'?" in message
    assert "--set train.warmup_step=1" in message


def test_key_in_wrong_section_points_to_right_one(tmp_path):
    message = str(load_error(write(tmp_path, "model: {num_experts: 4}\n")))
    assert "did you mean 'moe.num_experts'?" in message


def test_unknown_section(tmp_path):
    message = str(load_error(write(tmp_path, "optim: {lr: 1}\n")))
    assert "unknown key 'optim'" in message and "Valid keys at top level:" in message


@pytest.mark.parametrize("override, fragment", [
    ("train.max_steps=abc", "train.max_steps: expected an integer, got 'abc'"),
    ("train.max_steps=1.5", "train.max_steps: expected an integer, got 1.5"),
    ("train.max_steps=true", "train.max_steps: expected an integer, got True"),  # bool is not int
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.lr=true", "train.lr: expected a number"),
    ("train.lr=null", "train.lr: expected a number, got null"),
    ("train.adam_betas=[0.9]", "train.adam_betas: expected a list of 2 values"),
    ("train.adam_betas=[0.9, x]", "train.adam_betas[1]: expected a number"),
    ("export.safe_serialization=1", "export.safe_serialization: expected true or false"),
    ("data.src_lang=no", "data.src_lang: expected a string, got False (bool); quote it"),
    ("moe=3", "moe: expected a mapping"),
    ("moe.jitter_mode=logit", "did you mean 'logits'?"),
    ("train.precision=fp8", "train.precision: 'fp8' is not allowed"),
    ("parallel.zero_stage=3", "parallel.zero_stage: '3' is not allowed"),
    ("model.preset=switch-base-7", "did you mean 'switch-base-8'?"),
    ("trainlr", "--set expects section.key=value"),
])
def test_type_errors(tmp_path, override, fragment):
    message = str(load_error(write(tmp_path, MINIMAL), [override]))
    assert fragment in message


@pytest.mark.parametrize("overrides, fragment", [
    (["moe.num_experts=2", "moe.estimator=topk", "moe.top_k=3"], "moe.top_k: must be between 1 and moe.num_experts=2"),
    (["moe.top_k=0"], "moe.top_k: must be between 1"),
    (["parallel.ep_size=3"], "parallel.ep_size: must divide moe.num_experts=8"),
    (["train.optimizer=adafactor", "parallel.zero_stage=1"],
     "parallel.zero_stage: must be 0 with train.optimizer=adafactor"),
    (["train.optimizer=adafactor", "train.precision=bf16", "parallel.zero_stage=1"],
     "parallel.zero_stage: must be 0 with train.optimizer=adafactor"),
    (["train.optimizer=adafactr"], "did you mean 'adafactor'?"),
    (["train.lr_scale={'emb[': 10}"], "train.lr_scale.emb[: is not a valid regular expression"),
    (["train.lr_scale.embed=0"], "train.lr_scale.embed: must be > 0"),
    (["train.lr_scale=10"], "train.lr_scale: expected a mapping"),
    (["train.lr_scale.embed=fast"], "train.lr_scale.embed: expected a number"),
    (["train.max_minutes=0"], "train.max_minutes: must be > 0 or null"),
    (["train.optimizer=adafactor", "train.precision=fp16"], "train.precision: must be fp32 or bf16 with"),
    (["moe.capacity_factor=0"], "moe.capacity_factor: must be > 0 or null"),
    (["moe.eval_capacity_factor=-1"], "moe.eval_capacity_factor: must be > 0 or null"),
    (["moe.estimator=sparsemixr"], "did you mean 'sparsemixer'?"),
    (["moe.estimator=sparsemixer", "moe.top_k=2"], "estimator 'sparsemixer' is defined for top_k=1"),
    (["moe.estimator=switch", "moe.top_k=2"], "estimator 'switch' is defined for top_k=1"),
    (["moe.estimator=sparsemixer_v2"], "estimator 'sparsemixer_v2' is defined for top_k=2"),
    (["moe.estimator=topk"], "estimator 'topk' needs top_k >= 2"),
    (["train.lr=0"], "train.lr: must be > 0"),
    (["moe.jitter_eps=1.5"], "moe.jitter_eps: must be in [0, 1)"),
    (["data.source=hub"], "data.hub_name: is required"),
    (["data.source=files", "data.train_src=a.en"], "data.train_tgt: is required"),
    (["data.max_tokens=100", "data.max_length=200"], "data.max_tokens: must be >= data.max_length"),
    (["data.vocab_size=40000"], "data.vocab_size: tokenizer vocabulary (40000) must fit model.vocab_size"),
    (["model.num_layers=1", "model.num_decoder_layers=1"], "moe.sparse_step: no layer would be sparse"),
    (["model.pad_token_id=32128"], "model.pad_token_id: must be a valid id"),
    (["export.max_shard_size=lots"], "export.max_shard_size: expected a size"),
])
def test_impossible_values(tmp_path, overrides, fragment):
    message = str(load_error(write(tmp_path, MINIMAL), overrides))
    assert fragment in message


@pytest.mark.parametrize("overrides", [
    ["parallel.ep_size=2", "parallel.zero_stage=1"],
    ["parallel.ep_size=8", "parallel.zero_stage=2", "train.precision=bf16"],
    ["moe.estimator=sparsemixer_v2", "moe.top_k=2"],
    ["moe.estimator=topk", "moe.top_k=2"],
    ["moe.capacity_factor=null", "moe.estimator=reinmax"],
    ["model.num_layers=1", "model.num_decoder_layers=1", "moe.sparse_step=1"],
    ["model.arch=encoder", "model.num_decoder_layers=0"],
])
def test_possible_values_pass(tmp_path, overrides):
    load_config(write(tmp_path, MINIMAL), overrides)


def test_validation_error_names_the_override(tmp_path):
    assert "(from --set moe.top_k=9)" in str(load_error(write(tmp_path, MINIMAL), ["moe.top_k=9"]))


def test_export_after_train_is_for_translation(tmp_path):
    path = write(tmp_path, "task: electra\nmodel: {arch: encoder}\nexport: {after_train: true}\n")
    err = load_error(path)
    assert err.key == "export.after_train" and "not 'electra'" in str(err)
    assert load_config(write(tmp_path, "export: {after_train: true}\n", "t.yaml")).export.after_train


def test_missing_file_and_bad_yaml(tmp_path):
    assert "cannot read config file" in str(load_error(tmp_path / "nope.yaml"))
    assert "invalid YAML" in str(load_error(write(tmp_path, "moe: {num_experts: [\n")))
    assert "expected a mapping of sections" in str(load_error(write(tmp_path, "- 1\n- 2\n")))


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# --- round trip and shipped recipes --------------------------------------------------------------


def test_resolved_config_round_trips(tmp_path):
    overrides = ["moe.capacity_factor=null", "train.adam_betas=[0.8, 0.9]", "train.lr=1e-3",
                 "data.cache_dir=/tmp/c", "parallel.ep_size=2", "parallel.zero_stage=2"]
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert C.config_to_dict(again) == C.config_to_dict(cfg)
    assert yaml.safe_load(out.read_text())["train"]["adam_betas"] == [0.8, 0.9]


def test_round_trip_does_not_depend_on_preset(tmp_path):
    # Every value is explicit in the saved file, so the preset cannot shift it on reload.
    cfg = load_config(write(tmp_path, "model: {preset: switch-base-8, d_ff: 1000}\n"))
    assert load_config(save_config(cfg, tmp_path / "saved.yaml")) == cfg


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.name


# --- conventions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = C.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_builtin_estimator_names_exist_in_registry():
    # Validation accepts the built-in names without importing torch; they must stay real.
    estimators = pytest.importorskip("moetrain.moe.estimators")
    registry = set(estimators.ESTIMATORS)
    assert set(C._BUILTIN_ESTIMATORS) <= registry
    assert set(C.known_estimators()) == registry
