"""Settings resolution: files, profiles, environment, flags, validation and key masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglrun.cli.config import Settings, load_settings
from sglrun.errors import ConfigError, InvalidArgumentError

SECRET = "sk-test-SECRET123"


@pytest.fixture
def dirs(tmp_path):
    project = tmp_path / "project"
    user = tmp_path / "user"
    project.mkdir()
    user.mkdir()
    return project, user


def load(dirs, *, env=None, flags=None, profile=None, config_file=None) -> Settings:
    project, user = dirs
    return load_settings(
        flags=flags or {},
        config_file=config_file,
        profile=profile,
        env=env or {},
        cwd=project,
        user_dir=user,
    )


def write_user(dirs, text: str) -> Path:
    path = dirs[1] / "config.yaml"
    path.write_text(text)
    return path


def write_project(dirs, text: str) -> Path:
    path = dirs[0] / "sglrun.yaml"
    path.write_text(text)
    return path


def test_defaults_without_any_file(dirs):
    settings = load(dirs)
    assert settings.backend == "local"
    assert settings.concurrency == "auto"
    assert settings.temperature is None and settings.url is None
    assert set(settings.sources.values()) == {"default"}
    assert settings.files == []


def test_precedence_flags_env_project_user_default(dirs):
    user = write_user(dirs, "model: u\ntemperature: 0.1\ntop_p: 0.5\ntop_k: 3\nretries: 5\n")
    project = write_project(dirs, "temperature: 0.2\ntop_p: 0.6\ntop_k: 4\n")
    env = {"SGLRUN_TOP_P": "0.7", "SGLRUN_TOP_K": "8"}
    settings = load(dirs, env=env, flags={"top_k": 9, "model": None})
    assert settings.retries == 5 and settings.sources["retries"] == f"user file {user}"
    assert settings.model == "u"  # a None flag means "not given"
    assert settings.temperature == 0.2
    assert settings.sources["temperature"] == f"project file {project}"
    assert settings.top_p == 0.7 and settings.sources["top_p"] == "env SGLRUN_TOP_P"
    assert settings.top_k == 9 and settings.sources["top_k"] == "flag --top-k"
    assert settings.timeout == 600.0 and settings.sources["timeout"] == "default"
    assert settings.files == [str(user), str(project)]


def test_env_values_are_typed(dirs):
    env = {
        "SGLRUN_BACKEND": "sglang",
        "SGLRUN_URL": "http://a:30000, http://b:30000",
        "SGLRUN_MODEL": "m",
        "SGLRUN_TEMPERATURE": "0",
        "SGLRUN_MAX_NEW_TOKENS": "64",
        "SGLRUN_NUM_THREADS": "4",
        "SGLRUN_STOP": '["\\n", "END"]',
        "SGLRUN_TIMEOUT": "30",
        "SGLRUN_RETRIES": "0",
    }
    settings = load(dirs, env=env)
    assert settings.backend == "sglang"
    assert settings.url == ["http://a:30000", "http://b:30000"]
    assert settings.temperature == 0.0 and settings.max_new_tokens == 64
    assert settings.concurrency == 4 and settings.stop == ["\n", "END"]
    assert settings.timeout == 30.0 and settings.retries == 0
    assert settings.sampling_params() == {
        "temperature": 0.0,
        "max_new_tokens": 64,
        "stop": ["\n", "END"],
    }
    assert load(dirs, env={"SGLRUN_NUM_THREADS": "auto", "SGLRUN_STOP": "###"}).stop == ["###"]


def test_bad_env_value_names_the_variable(dirs):
    with pytest.raises(ConfigError, match="SGLRUN_TEMPERATURE.*number.*'hot'"):
        load(dirs, env={"SGLRUN_TEMPERATURE": "hot"})
    with pytest.raises(ConfigError, match="SGLRUN_NUM_THREADS.*auto"):
        load(dirs, env={"SGLRUN_NUM_THREADS": "0"})


def test_profile_applies_on_top_of_its_own_file_level(dirs):
    write_user(dirs, "profiles:\n  fast:\n    max_new_tokens: 8\n    temperature: 0.9\n")
    project = write_project(
        dirs, "temperature: 0.3\nmodel: p\nprofiles:\n  fast:\n    model: p-fast\n"
    )
    settings = load(dirs, profile="fast")
    assert settings.profile == "fast"
    assert settings.model == "p-fast"
    assert settings.sources["model"] == f"profile 'fast' in {project}"
    assert settings.max_new_tokens == 8
    assert settings.temperature == 0.3  # the project's top level beats a user-file profile
    env_wins = load(dirs, profile="fast", env={"SGLRUN_MODEL": "env"})
    assert env_wins.model == "env"


def test_profile_selection_order(dirs):
    write_project(
        dirs,
        "default_profile: a\nprofiles:\n  a: {model: from-a}\n  b: {model: from-b}\n"
        "  c: {model: from-c}\n",
    )
    assert load(dirs).model == "from-a"
    assert load(dirs, env={"SGLRUN_PROFILE": "b"}).model == "from-b"
    assert load(dirs, env={"SGLRUN_PROFILE": "b"}, profile="c").model == "from-c"


def test_unknown_profile_lists_the_known_ones(dirs):
    write_project(dirs, "profiles:\n  alpha: {}\n  beta: {top_k: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown profile 'gamma'; profiles: alpha, beta"):
        load(dirs, profile="gamma")
    with pytest.raises(ConfigError, match="unknown profile 'x'.*none are defined"):
        load((dirs[0] / "empty", dirs[1]), profile="x")


def test_unknown_key_suggests_the_nearest(dirs):
    path = write_project(dirs, "temprature: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load(dirs)
    message = str(info.value)
    assert str(path) in message and "'temprature'" in message
    assert "did you mean 'temperature'?" in message


def test_unknown_key_inside_a_profile(dirs):
    write_user(dirs, "profiles:\n  fast:\n    max_tokens: 3\n")
    with pytest.raises(
        ConfigError, match=r"profiles\.fast: unknown key 'max_tokens'.*'max_new_tokens'"
    ):
        load(dirs)


def test_api_key_in_file_is_refused_without_echoing_it(dirs):
    write_project(dirs, f"api_key: {SECRET}\n")
    with pytest.raises(ConfigError) as info:
        load(dirs)
    assert SECRET not in str(info.value) and "api_key_env" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("temperature: hot\n", "temperature", "a number"),
        ("max_new_tokens: 1.5\n", "max_new_tokens", "an int >= 0"),
        ("num_threads: many\n", "num_threads", '"auto" or an integer'),
        ("url: 3\n", "url", "a string or a non-empty list of strings"),
        ("backend: llama\n", "backend", "one of local, sglang, openai, anthropic"),
        ("retries: true\n", "retries", "an integer"),
        ("top_p: 0\n", "top_p", "a number in (0, 1]"),
    ],
)
def test_wrong_type_names_file_key_and_type(dirs, text, key, expected):
    path = write_project(dirs, text)
    with pytest.raises(ConfigError) as info:
        load(dirs)
    message = str(info.value)
    assert message.startswith(f"{path}: key {key!r} must be {expected}")


def test_bad_yaml_and_bad_shape(dirs):
    write_project(dirs, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="sglrun.yaml:2: not valid YAML"):
        load(dirs)
    write_project(dirs, "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load(dirs)
    write_project(dirs, "profiles: [a]\n")
    with pytest.raises(ConfigError, match="'profiles' must be a mapping"):
        load(dirs)
    write_project(dirs, "profiles:\n  p:\n    default_profile: q\n")
    with pytest.raises(ConfigError, match="profiles.p: unknown key 'default_profile'"):
        load(dirs)


def test_explicit_config_file_replaces_project_and_user(dirs, tmp_path):
    write_user(dirs, "model: user\nretries: 7\n")
    write_project(dirs, "model: project\n")
    explicit = tmp_path / "custom.yaml"
    explicit.write_text("model: explicit\n")
    settings = load(dirs, config_file=str(explicit))
    assert settings.model == "explicit" and settings.retries == 2
    assert settings.sources["model"] == f"config file {explicit}"
    with pytest.raises(ConfigError, match="not found"):
        load(dirs, config_file=str(tmp_path / "missing.yaml"))


def test_empty_file_is_fine(dirs):
    write_project(dirs, "")
    assert load(dirs).backend == "local"


def test_unknown_flag_is_a_programming_error(dirs):
    with pytest.raises(InvalidArgumentError, match="temp"):
        load(dirs, flags={"temp": 1})
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        load(dirs, flags={"max_new_tokens": -1})


def test_masked_shows_name_and_status_never_the_key(dirs):
    write_project(dirs, "backend: openai\napi_key_env: MY_KEY\n")
    settings = load(dirs, env={"MY_KEY": SECRET})
    shown = settings.masked()
    assert shown["api_key_env"] == "MY_KEY" and shown["api_key"] == "set"
    dumped = json.dumps(shown) + repr(settings) + str(settings.__dict__)
    assert SECRET not in dumped
    assert settings.api_key({"MY_KEY": SECRET}) == SECRET  # readable only on purpose
    unset = load(dirs, env={"OTHER": SECRET}).masked()
    assert unset["api_key"] == "not set" and SECRET not in json.dumps(unset)


def test_backend_default_key_variable(dirs):
    settings = load(dirs, env={"SGLRUN_BACKEND": "anthropic", "ANTHROPIC_API_KEY": SECRET})
    assert settings.api_key_env == "ANTHROPIC_API_KEY"
    assert settings.masked()["api_key"] == "set"
    assert SECRET not in json.dumps(settings.masked())


def test_key_put_where_the_name_belongs_is_refused_without_echo(dirs):
    with pytest.raises(ConfigError) as info:
        load(dirs, env={"SGLRUN_API_KEY_ENV": SECRET})
    assert "SGLRUN_API_KEY_ENV" in str(info.value) and SECRET not in str(info.value)
    write_project(dirs, f"api_key_env: {SECRET}\n")
    with pytest.raises(ConfigError) as info:
        load(dirs)
    assert "api_key_env" in str(info.value) and SECRET not in str(info.value)


def test_user_dir_defaults_to_typer_app_dir(dirs, tmp_path, monkeypatch):
    app_dir = tmp_path / "appdir"
    app_dir.mkdir()
    (app_dir / "config.yaml").write_text("retries: 9\n")
    monkeypatch.setattr("typer.get_app_dir", lambda name: str(app_dir) if name == "sglrun" else "")
    settings = load_settings(flags={}, config_file=None, profile=None, env={}, cwd=dirs[0])
    assert settings.retries == 9


def test_coalesce_from_file_and_environment(dirs):
    assert load(dirs).coalesce is True
    write_project(dirs, "coalesce: false\n")
    assert load(dirs).coalesce is False
    assert load(dirs, env={"SGLRUN_COALESCE": "yes"}).coalesce is True
    write_project(dirs, "coalesce: sometimes\n")
    with pytest.raises(ConfigError, match="key 'coalesce' must be true or false, got str"):
        load(dirs)



def test_engine_settings_from_file_env_and_flags_reach_the_backend(dirs):
    from sglrun.cli.loader import backend_options

    write_project(dirs, "engine_threads: 3\nslots: 4\nctx_size: 4096\n")
    settings = load(dirs)
    options = backend_options(settings)
    assert (options.engine_threads, options.slots, options.ctx_size) == (3, 4, 4096)
    env = {"SGLRUN_ENGINE_THREADS": "1", "SGLRUN_SLOTS": "2", "SGLRUN_CTX_SIZE": "1024"}
    settings = load(dirs, env=env)
    assert (settings.engine_threads, settings.slots, settings.ctx_size) == (1, 2, 1024)
    assert settings.sources["slots"] == "env SGLRUN_SLOTS"
    settings = load(dirs, env=env, flags={"engine_threads": "auto", "slots": 8})
    assert backend_options(settings).engine_threads is None  # auto: chosen at start
    assert settings.slots == 8 and settings.sources["slots"] == "flag --slots"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("slots: 0\n", "an integer >= 1"), ("ctx_size: 10\n", "an integer >= 256"),
     ("engine_threads: none\n", '"auto" or an integer')],
)  # fmt: skip
def test_bad_engine_settings_name_the_key(dirs, text, expected):
    write_project(dirs, text)
    with pytest.raises(ConfigError, match=expected):
        load(dirs)


def test_num_threads_is_an_alias_of_concurrency(dirs):
    write_project(dirs, "num_threads: 7\n")
    assert load(dirs).concurrency == 7
    assert load(dirs, env={"SGLRUN_NUM_THREADS": "5"}).concurrency == 5
    both = {"SGLRUN_NUM_THREADS": "5", "SGLRUN_CONCURRENCY": "6"}
    assert load(dirs, env=both).concurrency == 6  # the current name wins
    assert load(dirs, flags={"num_threads": "3"}).concurrency == 3
    with pytest.raises(ConfigError, match="'num_threads'"):  # named as the user wrote it
        write_project(dirs, "num_threads: lots\n")
        load(dirs)


def test_config_show_describes_the_engine(dirs, monkeypatch):
    from sglrun.cli.loader import describe_engine

    write_project(dirs, "engine_threads: 1\nslots: 2\n")
    line = describe_engine(load(dirs))
    assert line.endswith("1 threads, 2 slots, context 4096 tokens (2048 per slot)")
    assert ".gguf" in line
    auto = describe_engine(load(dirs, flags={"engine_threads": "auto"}))
    assert "auto = " in auto and " threads" in auto


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_new_tokens", 0), ("max_new_tokens", -1), ("top_k", 0), ("top_k", -1), ("top_p", 1.5),
     ("temperature", -0.1), ("temperature", 0)],
)  # fmt: skip
def test_settings_and_gen_share_one_rule_table(dirs, key, value):
    """A value the language takes in gen() is taken in a settings file, and only those."""
    import sglrun as sgl

    try:
        sgl.gen("x", **{"max_tokens" if key == "max_new_tokens" else key: value})
        language_ok = True
    except sgl.errors.InvalidArgumentError:
        language_ok = False
    write_project(dirs, f"{key}: {value}\n")
    try:
        load(dirs)
        settings_ok = True
    except ConfigError:
        settings_ok = False
    assert language_ok == settings_ok


def test_ray_section_from_file_and_environment(dirs):
    project, _ = dirs
    (project / "sglrun.yaml").write_text(
        "ray:\n  address: auto\n  workers: 2..8\n  cpus_per_worker: 2\n  rows_per_batch: 500\n"
    )
    settings = load(dirs)
    assert settings.ray == {"address": "auto", "workers": (2, 8), "cpus_per_worker": 2.0,
                            "rows_per_block": 500}  # fmt: skip
    assert load(dirs, env={"SGLRUN_RAY": "ray://head:10001"}).ray == {
        "address": "ray://head:10001"
    }


@pytest.mark.parametrize("text,expected", [
    ("ray:\n  workers: 8..2\n", 'a range "MIN..MAX"'),
    ("ray:\n  wokers: 2\n", "(not 'wokers')"),
    ("ray:\n  cpus_per_worker: 0\n", "cpus_per_worker as a number >= 0.01"),
    ("ray:\n  rows_per_batch: 0\n", "rows_per_batch as an integer >= 1"),
])  # fmt: skip
def test_bad_ray_settings_name_the_key(dirs, text, expected):
    project, _ = dirs
    (project / "sglrun.yaml").write_text(text)
    with pytest.raises(ConfigError, match="key 'ray'") as caught:
        load(dirs)
    assert expected in str(caught.value)
