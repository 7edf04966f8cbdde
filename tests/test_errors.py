"""Every problem a user can fix is a UniPortraitError (one line, exit code 2), at every entry point."""

from __future__ import annotations

import json

import pytest

from uniportrait.cli import main
from uniportrait.errors import ConfigError, UniPortraitError


@pytest.mark.parametrize(
    "config_class, bad",
    [
        ("uniportrait.models.qformer:QFormerConfig", {"depth": -1}),
        ("uniportrait.models.qformer:QFormerConfig", {"bogus": 1}),
        ("uniportrait.models.qformer:QFormerConfig", {"depth": "two"}),
        ("uniportrait.models.face_backbone:IRBackboneConfig", {"blocks": [1, 2]}),
        ("uniportrait.models.image_proj:ImageProjectionConfig", {"num_tokens": 0}),
        ("uniportrait.models.qformer:QFormerConfig", ["not", "an", "object"]),
    ],
)
def test_bad_configs_are_config_errors(config_class, bad):
    import importlib

    module, name = config_class.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError) as info:
        cls.from_dict(bad)
    assert isinstance(info.value, UniPortraitError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["top", "qformer", "layer"])
def test_adapter_config_with_an_unknown_key_is_a_clean_error(tmp_path, capsys, tiny_pipe, where):
    from uniportrait.faces import sample_photo

    folder = tiny_pipe.adapter.save_pretrained(tmp_path / "adapter")
    config = json.loads((folder / "config.json").read_text())
    {"top": config, "qformer": config["qformer_config"], "layer": config["layers"][0]}[where]["surprise"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["generate", "--prompt", "p", "--id", str(sample_photo("ffhq-0100")), "--out", str(tmp_path / "o"),
                 "--preset", "tiny", "--steps", "1", "--width", "64", "--height", "64", "--adapter", str(folder)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "surprise" in err and err.count("\n") == 1, err


def test_server_config_errors_are_config_errors():
    from uniportrait.server.config import ServerConfig

    with pytest.raises(ConfigError, match="workers"):
        ServerConfig(workers=0)


@pytest.mark.parametrize("name", ["alice\n", "alice\r\n", "bob\n"])
def test_identity_names_with_a_trailing_newline_are_refused(name, tmp_path, capsys):
    from uniportrait.bank import check_name
    from uniportrait.errors import IdentityError
    from uniportrait.faces import sample_photo

    with pytest.raises(IdentityError, match="invalid identity name"):
        check_name(name)
    code = main(
        ["id", "--home", str(tmp_path), "add", name, str(sample_photo("ffhq-0100")), "--preset", "tiny"]
    )
    assert code == 2 and "invalid identity name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
