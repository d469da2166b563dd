import pytest

from marsjax import cli
from marsjax.config import (
    ConfigError,
    from_dict,
    get_preset,
    override,
    parse_overrides,
    to_dict,
    validate,
)

BAD = [
    ("data.name", "svhn", "data.name"),
    ("data.num_clients", 0, "data.num_clients"),
    ("data.dirichlet_alpha", 0.0, "data.dirichlet_alpha"),
    ("data.dirichlet_alpha", -1.0, "data.dirichlet_alpha"),
    ("data.dirichlet_alpha", float("nan"), "data.dirichlet_alpha"),
    ("data.partition", "shards", "data.partition"),
    ("data.samples_per_client", 4, "data.samples_per_client"),  # without partition "sampled"
    ("data.samples_per_client", 0, "data.samples_per_client"),
    ("model.name", "vgg", "model.name"),
    ("model.conv_impl", "cudnn", "model.conv_impl"),
    ("model.width", "paper", "model.width"),  # 28x28 SimpleNet on 8x8 digits
    ("train.lr", -0.1, "train.lr"),
    ("train.lr", 0, "train.lr"),
    ("train.momentum", 1.0, "train.momentum"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.batch_size", 2.5, "train.batch_size"),
    ("train.local_epochs", 0, "train.local_epochs"),
    ("run.rounds", 0, "run.rounds"),
    ("run.clients_per_round", 31, "run.clients_per_round"),
    ("run.server_rule", "median", "run.server_rule"),
    ("run.client_strategy", "pmap", "run.client_strategy"),
    ("run.client_chunk", 0, "run.client_chunk"),
    ("attack.name", "3dfedd", "attack.name"),
    ("attack.num_attackers", 31, "attack.num_attackers"),
    ("attack.attackers_per_round", 7, "attack.attackers_per_round"),  # more than num_attackers
    ("attack.target_label", 10, "attack.target_label"),
    ("attack.poison_fraction", 1.5, "attack.poison_fraction"),
    ("attack.stop_round", 0, "attack.stop_round"),
    ("defense.name", "krumm", "defense.name"),
]


@pytest.mark.parametrize("field,value,named", BAD)
def test_invalid_values_name_the_field(field, value, named):
    cfg = override(get_preset("demo", defense="fedavg"), {field: value})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert named in str(e.value)
    assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_more_attackers_than_benign_slots():
    cfg = override(
        get_preset("demo", defense="fedavg"),
        {"attack.num_attackers": 25, "attack.attackers_per_round": 2},
    )
    with pytest.raises(ConfigError, match="attack.attackers_per_round"):
        validate(cfg)


def test_unknown_options_are_rejected_with_a_hint():
    cfg = override(get_preset("demo", defense="fedavg"), {"attack.options.scael": 2})
    with pytest.raises(ConfigError, match=r"attack.options.scael.*did you mean 'scale'"):
        validate(cfg)


def test_overrides_are_typed_by_field():
    cfg = override(
        get_preset("demo", defense="fedavg"),
        parse_overrides(
            [
                "attack.name=none",
                "run.rounds=7",
                "run.client_chunk=None",
                "train.lr=0.3",
                "model.batch_norm=false",
                "attack.options.scale=2.5",
                "defense.options={}",
            ]
        ),
    )
    assert cfg.attack.name == "none" and cfg.run.rounds == 7 and cfg.run.client_chunk is None
    assert cfg.train.lr == 0.3 and cfg.model.batch_norm is False
    assert cfg.attack.options == {"scale": 2.5}
    with pytest.raises(ConfigError, match="run has no field 'round'.*run.rounds"):
        override(cfg, {"run.round": 3})
    with pytest.raises(ConfigError, match="section"):
        override(cfg, {"foo.bar": 3})


def test_options_override_reads_json_and_a_non_mapping_is_a_field_error(capsys):
    # JSON spellings (false, null) are what users paste; a Python literal still works.
    cfg = override(
        get_preset("demo", defense="fedavg"),
        parse_overrides(['attack.options={"scale": 2.5, "loss_weights": null, "x": false}']),
    )
    assert cfg.attack.options == {"scale": 2.5, "loss_weights": None, "x": False}
    cfg = override(cfg, parse_overrides(["attack.options={'scale': 3}"]))
    assert cfg.attack.options == {"scale": 3}
    bad = override(get_preset("demo", defense="fedavg"), {"attack.options": "notadict"})
    with pytest.raises(ConfigError, match="attack.options.*must be a mapping"):
        validate(bad)
    assert cli.main(["validate", "demo", "--set", "defense.options=[1, 2]"]) == 2
    assert "defense.options" in capsys.readouterr().err


def test_dict_roundtrip():
    cfg = get_preset("demo")
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown fields"):
        from_dict({**to_dict(cfg), "run": {**to_dict(cfg)["run"], "bogus": 1}})


def test_cli_validate_and_errors(capsys, tmp_path):
    assert cli.main(["validate", "demo", "--set", "defense.name=fedavg"]) == 0
    assert cli.main(["validate", "demo", "--set", "run.rounds=-1"]) == 2
    assert "run.rounds=-1" in capsys.readouterr().err
    f = tmp_path / "c.py"
    f.write_text(
        "from marsjax.config import get_preset\n"
        "def get_config():\n    return get_preset('demo', defense='fedavg')\n"
    )
    assert cli.main(["validate", str(f)]) == 0
    assert cli.main(["validate", "nosuch"]) == 2


def test_sampled_partition_needs_samples_per_client():
    cfg = override(get_preset("quickstart"), {"data.partition": "sampled"})
    with pytest.raises(ConfigError, match="data.samples_per_client"):
        validate(cfg)
    validate(override(cfg, {"data.samples_per_client": 8}))


def test_a_field_added_later_matches_folders_saved_without_it():
    from marsjax.checkpoint import config_diff, fingerprint

    cfg = get_preset("quickstart")
    saved = to_dict(cfg)
    del saved["data"]["samples_per_client"]  # a config.json written before the field existed
    assert config_diff(saved, to_dict(cfg)) == []
    assert fingerprint(saved) == fingerprint(cfg)
    sampled = override(cfg, {"data.partition": "sampled", "data.samples_per_client": 8})
    assert config_diff(saved, to_dict(sampled)) == ["data.partition", "data.samples_per_client"]
    assert fingerprint(saved) != fingerprint(sampled)
