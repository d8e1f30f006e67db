"""Presets: the built-in four, user TOML files in the config dir, and one-line errors naming file, line, field."""
import pytest

from mmchat.chat import presets
from mmchat.errors import MMChatError
from mmchat.generate import SamplingParams


def test_builtin_presets_cover_the_four_uses():
    p = presets.builtin_presets()
    assert {"customer-service", "writer", "translator", "personal-assistant"} <= set(p)
    for preset in p.values():
        assert preset.system_prompt and preset.description
        SamplingParams(**preset.sampling).validate()
        assert "{{" not in preset.system_prompt  # every placeholder has a default
    cs = p["customer-service"]
    assert "order number" in cs.system_prompt and "human" in cs.system_prompt
    assert [m["role"] for m in cs.example_messages] == ["user", "assistant"] * 2
    assert p["writer"].sampling["temperature"] > p["translator"].sampling["temperature"]


def test_variables_fill_the_prompt():
    t = presets.get("translator", source="German", target="Spanish")
    assert "from German into Spanish" in t.system_prompt
    w = presets.get("writer").with_vars(form="a poem", length="eight lines", style="playful")
    assert "Write a poem of eight lines, in a playful style" in w.system_prompt
    with pytest.raises(MMChatError, match="has no setting colour; it has: source, target"):
        presets.get("translator", colour="red")
    assert presets.parse_assignments(["target=French", "source = English"]) == {"target": "French",
                                                                                "source": "English"}
    with pytest.raises(MMChatError, match="not NAME=VALUE"):
        presets.parse_assignments("French")


def test_user_presets_from_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "pirate.toml").write_text('description = "Arr"\nsystem = "You are a pirate named {{name}}."\n'
                                        '[variables]\nname = "Jack"\n[sampling]\ntemperature = 0.9\ntop_k = 40\n'
                                        '[[messages]]\nrole = "user"\ncontent = "Hi"\n'
                                        '[[messages]]\nrole = "assistant"\ncontent = "Ahoy, I be {{name}}!"\n')
    (folder / "writer.toml").write_text('system = "Only haiku."\n')  # a user file overrides a built-in by name
    (folder / "broken.toml").write_text('system = "unterminated\n')
    found = presets.available()
    assert "pirate" in found and found["writer"].system_prompt == "Only haiku."
    assert "broken" not in found and "translator" in found  # one bad file does not hide the others
    pirate = presets.get("pirate", name="Anne")
    assert pirate.system_prompt == "You are a pirate named Anne."
    assert pirate.example_messages[1]["content"] == "Ahoy, I be Anne!"
    assert pirate.sampling == {"temperature": 0.9, "top_k": 40}
    assert presets.get(str(folder / "pirate.toml")).name == "pirate"  # a path works too
    with pytest.raises(MMChatError, match=r"broken.toml:1: not valid TOML"):
        presets.get("broken")


@pytest.mark.parametrize("text,where", [
    ('system = "x"\ntemprature = 0.5\n', r":2: unknown field 'temprature'"),
    ('system = "x"\n[sampling]\ntop_p = 0.9\ntemperature = "hot"\n', r":4: sampling.temperature must be float"),
    ('[sampling]\ntop_p = 1.5\n', r":2: sampling.top_p must be in \(0, 1\]"),
    ('[sampling]\ntempo = 1\n', r":2: unknown sampling setting 'tempo'"),
    ('system = ["a"]\n', r":1: 'system' must be text"),
    ('system = "Hi {{who}}"\n', r":1: \{\{who\}\} is used but \[variables\] gives it no default"),
    ('[[messages]]\nrole = "robot"\ncontent = "x"\n', r"messages\[0\] needs role"),
    ('system = "a"\nsystem = "b"\n', r":2: not valid TOML"),
])
def test_malformed_preset_names_line_and_field(tmp_path, text, where):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MMChatError, match=where) as e:
        presets.load_preset_file(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unknown_preset_lists_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))
    with pytest.raises(MMChatError, match="no preset 'pirate'; known: customer-service, personal-assistant"):
        presets.get("pirate")
    with pytest.raises(MMChatError, match="not a preset name"):
        presets.get("two words")
    with pytest.raises(MMChatError, match="cannot read preset"):
        presets.get("../missing.toml")


def test_config_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCHAT_HOME", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert presets.user_presets_dir() == tmp_path / "mmchat" / "presets"
