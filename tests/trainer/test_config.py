"""The config tree: YAML files, dotted overrides, and one-line errors that name the key."""

import pytest

from tests.support.paths import CONFIGS
from trainer.config import Config, ConfigError, load_config, to_dict


def test_default_yaml_equals_the_built_in_default():
    assert to_dict(load_config(CONFIGS / "default.yaml")) == to_dict(Config())


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml", "sagan_imagenet128.yaml"])
def test_shipped_configs_load(name):
    load_config(CONFIGS / name)


def test_paper_config_holds_the_paper_setting():
    cfg = load_config(CONFIGS / "sagan_imagenet128.yaml")
    assert cfg.model.resolution == 128 and cfg.model.attention_resolutions == [64]
    assert cfg.trainer.global_batch_size == 256
    assert (cfg.trainer.lr_d, cfg.trainer.lr_g) == (4e-4, 1e-4)
    assert cfg.trainer.betas_g == cfg.trainer.betas_d == [0.0, 0.9]


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "trainer.max_steps=7",
            "trainer.lr_d=2e-4",
            "trainer.precision=bf16",
            "model.attention_resolutions=[16,32]",
            "data.url=s3://bucket/prefix",
            "checkpoint.resume=false",
        ],
    )
    assert cfg.trainer.max_steps == 7
    assert cfg.trainer.lr_d == pytest.approx(2e-4)
    assert cfg.trainer.precision == "bf16"
    assert cfg.model.attention_resolutions == [16, 32]
    assert cfg.data.url == "s3://bucket/prefix"
    assert cfg.checkpoint.resume is False


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_steps: 5\n  seed: 3\n")
    cfg = load_config(path, ["trainer.max_steps=9"])
    assert (cfg.trainer.max_steps, cfg.trainer.seed) == (9, 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_stepz=3", "trainer.max_stepz: unknown key (did you mean trainer.max_steps?)"),
        ("modle.resolution=32", "modle: unknown key (did you mean model?)"),
        ("trainer.max_steps=ten", "trainer.max_steps='ten' must be an integer"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be positive"),
        ("trainer.backend=horovod", "trainer.backend='horovod' is not one of ddp, deepspeed"),
        ("model.resolution=48", "model.resolution=48 is not one of 32, 64, 128"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not one of fp32, bf16, fp16"),
        ("trainer.lr_d=fast", "trainer.lr_d='fast' must be a number"),
        ("checkpoint.resume=maybe", "checkpoint.resume='maybe' must be true or false"),
        ("trainer.betas_d=[0.5]", "trainer.betas_d=[0.5] must be two numbers in [0, 1)"),
        (
            "model.attention_resolutions=[24]",
            "model.attention_resolutions",
        ),
        ("trainer", "override 'trainer' is not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("7\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    section = tmp_path / "section.yaml"
    section.write_text("trainer: 3\n")
    with pytest.raises(ConfigError, match="trainer must be a section"):
        load_config(section)
