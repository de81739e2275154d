"""`--config_overrides` of the example scripts: one parser, `nepa_hf.training.config_overrides.parse_config_overrides`,
giving constructor arguments typed by NepaConfig's fields."""

import importlib.util
import sys
from pathlib import Path

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError

from nepa_hf import NepaConfig
from nepa_hf.training.config_overrides import parse_config_overrides

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_values_are_typed_like_the_fields():
    overrides = parse_config_overrides(
        "hidden_size=32, num_hidden_layers=3,use_auxiliary_head=false,drop_path_rate=0.1,rope_theta=10,pooling=last,"
        "pool_scales=1:2,out_indices=0:1:2:3,pos_embed_shift=0.5"
    )
    assert overrides == {
        "hidden_size": 32, "num_hidden_layers": 3, "use_auxiliary_head": False, "drop_path_rate": 0.1,
        "rope_theta": 10.0, "pooling": "last", "pool_scales": [1, 2], "out_indices": [0, 1, 2, 3],
        "pos_embed_shift": 0.5,
    }
    assert type(overrides["rope_theta"]) is float and parse_config_overrides(None) == {}
    # As constructor arguments they are checked and what depends on them is derived: the backbone stages follow
    # num_hidden_layers (setting it on a built config would leave the preset's 6-block stages).
    config = NepaConfig.from_preset("nepa-vit-micro", **parse_config_overrides("num_hidden_layers=3"))
    assert config.out_indices == [3] and config.stage_names[-1] == "stage3"
    with pytest.raises(StrictDataclassClassValidationError, match="divisible by num_attention_heads"):
        NepaConfig(**parse_config_overrides("hidden_size=30"))
    # Backbone stages are checked by the constructor against the final layer count (here 24, from the same string).
    large = NepaConfig(**parse_config_overrides("num_hidden_layers=24,out_indices=8:12:16:24"))
    assert large.out_indices == [8, 12, 16, 24] and large.stage_names[-1] == "stage24"
    with pytest.raises(ValueError, match="out_indices"):
        NepaConfig(**parse_config_overrides("out_indices=8:12:16:24"))  # 12 blocks by default
    assert parse_config_overrides("layerscale_value=none,is_causal=true") == {"layerscale_value": None, "is_causal": True}


@pytest.mark.parametrize(
    "text, message",
    [
        ("hiden_size=64", r"'hiden_size' is not a field of NepaConfig\. Did you mean 'hidden_size'\?"),
        ("colour=red", r"'colour' is not a field of NepaConfig\. NEPA's fields: apply_layernorm, .*pool_scales"),
        ("hidden_size", r"'hidden_size' is not of the form field=value"),
        ("hidden_size=big", r"Config override 'hidden_size=big': invalid literal for int"),
        ("is_causal=maybe", r"Config override 'is_causal=maybe': can't derive true or false"),
        ("pool_scales=1:two", r"Config override 'pool_scales=1:two'"),
        ("head_dim=16", r"'head_dim' is not a field"),  # a derived property, not a field
    ],
)
def test_a_bad_item_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_config_overrides(text)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}_overrides", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_script_uses_the_one_parser(tmp_path, monkeypatch):
    """A misspelt field stops each script with the same message before any training (the classification and
    pretraining scripts used to pass unknown keys into the config silently)."""
    from accelerate.state import AcceleratorState, GradientState

    bad = "hidden_size=32,num_hidden_layer=2"
    message = r"'num_hidden_layer' is not a field of NepaConfig\. Did you mean 'num_hidden_layers'\?"
    classification = load_example("finetune_classification")
    with pytest.raises(ValueError, match=message):
        classification.load_model(classification.ModelArguments(preset="nepa-vit-micro", config_overrides=bad), {}, {})

    monkeypatch.setattr(sys, "argv", [
        "finetune_segmentation.py", "--output_dir", str(tmp_path / "seg"), "--num_train_scenes", "2",
        "--num_eval_scenes", "1", "--scene_size", "32", "--use_cpu", "--report_to", "none", "--config_overrides", bad,
    ])
    with pytest.raises(ValueError, match=message):
        load_example("finetune_segmentation").main()

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(ValueError, match=message):
        load_example("pretrain_nepa").main(
            ["--model", "nepa-vit-micro", "--config_overrides", bad, "--output_dir", str(tmp_path / "pretrain"),
             "--dataset", "bundled", "--max_train_samples", "8", "--max_steps", "1", "--mixed_precision", "no"]
        )


def test_pretraining_from_a_config_file_with_fewer_layers(tmp_path):
    """A saved config names its backbone stages for its own layer count; overriding the count re-derives them."""
    NepaConfig.from_preset("nepa-vit-micro").to_json_file(tmp_path / "config.json")  # 6 blocks: stages up to 6
    pretrain = load_example("pretrain_nepa")
    args = pretrain.parse_args(["--model", str(tmp_path / "config.json"), "--config_overrides", "num_hidden_layers=2",
                                "--dataset", "bundled", "--output_dir", str(tmp_path / "out")])
    model, _ = pretrain.load_model(args)
    assert model.config.num_hidden_layers == 2 and model.config.stage_names[-1] == "stage2"
    assert len(model.nepa.encoder.layers) == 2
