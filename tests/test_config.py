import pytest
import yaml

from vpref.config import Config, ConfigError, describe_keys, load_config


def test_defaults_are_the_demo_and_every_key_is_documented():
    cfg = load_config(None)
    assert cfg.policy_member.name == "policy" and cfg.loop.rounds == 3
    rows = describe_keys()
    assert len(rows) > 100
    undocumented = [k for k, _, doc in rows if not doc.strip()]
    assert undocumented == []


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dpo": {"beta": 0.2}, "run": {"name": "x"}}))
    cfg = load_config(path, ["dpo.loss=ipo", "zoo.1.sampling.temperature=0.3", "judge.pool.max=4",
                             "pairs.max_length_ratio=1.5"])
    assert (cfg.dpo.beta, cfg.dpo.loss, cfg.run.name) == (0.2, "ipo", "x")
    assert cfg.zoo[1].sampling.temperature == 0.3 and cfg.judge.pool.max == 4
    assert cfg.pairs.max_length_ratio == 1.5
    # The resolved config round-trips through YAML.
    assert Config.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("override,message", [
    ("dpo.bta=0.2", "unknown key 'dpo.bta' (did you mean 'beta'?)"),
    ("dpo.beta=-1", "key 'dpo.beta': value -1 is not allowed: Input should be greater than 0"),
    ("dpo.loss=foo", "key 'dpo.loss': value 'foo' is not allowed: Input should be 'sigmoid', 'ipo', 'hinge' or 'robust'"),
    ("judge.pool.min=5", "section 'judge.pool': min (5) must be <= max (2)"),
    ("judge.kind=llm", "kind 'llm' needs judge.model"),
    ("zoo.0.name=strong", "zoo member names must be unique; repeated: ['strong']"),
    ("sft.members.1.init_from=nobody", "init_from 'nobody' must name an earlier member"),
    ("zoo.9.name=x", "'zoo.9.name' does not name a key"),
    ("nonsense", "must look like key.path=value"),
])
def test_bad_keys_and_values_are_refused_with_the_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("dpo:\n  beta: 0.1\n  lossy: ipo\n")
    with pytest.raises(ConfigError, match="unknown key 'dpo.lossy'"):
        load_config(tmp_path / "typo.yaml")


def test_cli_config_show(capsys):
    from vpref.cli import main

    assert main(["config", "show", "--set", "dpo.beta=0.25"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["dpo"]["beta"] == 0.25
    assert main(["config", "show", "--set", "dpo.bta=1"]) == 2
    assert "did you mean 'beta'" in capsys.readouterr().err


def test_every_shipped_config_and_recipe_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml")) + sorted((root / "recipes").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_config(f)
        assert cfg.policy_member is not None, f
        assert cfg.ray.namespace == f"vpref-{cfg.run.name}"


def test_namespace_follows_run_name_overrides_unless_set_explicitly():
    """Two runs on one cluster told apart by `--set run.name=...` must not share actor names."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert load_config(demo, ["run.name=other"]).ray.namespace == "vpref-other"
    assert load_config(None, ["run.name=a", "dpo.beta=0.2"]).ray.namespace == "vpref-a"
    assert load_config(None, ["ray.namespace=mine", "run.name=b"]).ray.namespace == "mine"
